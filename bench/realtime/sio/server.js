// Socket.IO 4 reference server for bench/realtime: the plainest fan-out, default options.
//
//   node [--expose-gc] server.js PORT
//
// Every connection joins the room "bench" (the counterpart of cozy's `subscribe chat:bench`); a
// "publish" event is broadcast to the whole room, sender included (cozy delivers to the publisher too),
// as a "message" event carrying the same payload. Nothing is stored: Socket.IO keeps no history, which
// is part of what the comparison shows. Prints "listening PORT" once ready.
"use strict";

const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.argv[2] || 9300);
const httpServer = http.createServer();
const io = new Server(httpServer);

io.on("connection", (socket) => {
  socket.join("bench");
  socket.on("publish", (data, ack) => {
    io.to("bench").emit("message", data);
    // Optional acknowledgement, in case a client asks for one (the load generator does not).
    if (typeof ack === "function") ack();
  });
});

httpServer.listen(port, "127.0.0.1", () => {
  console.log(`listening ${port}`);
});

// Ready for a clean stop from the run script.
process.on("SIGTERM", () => process.exit(0));
// The idle-memory run asks for a full GC (node started with --expose-gc) before its second reading.
process.on("SIGUSR2", () => {
  if (global.gc) global.gc();
});
