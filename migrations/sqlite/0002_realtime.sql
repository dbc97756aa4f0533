-- Realtime history, embedded SQLite. Same tables and constraints as migrations/mysql/0002_realtime.sql;
-- see the comments there. SQLite does not enforce VARCHAR lengths, so the CHECKs do.

CREATE TABLE rt_rooms (
  room TEXT NOT NULL PRIMARY KEY CHECK (length(room) BETWEEN 1 AND 191),
  last_seq INTEGER NOT NULL DEFAULT 0 CHECK (last_seq >= 0)
);

CREATE TABLE rt_messages (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  room TEXT NOT NULL REFERENCES rt_rooms (room),
  seq INTEGER NOT NULL CHECK (seq >= 1),
  kind TEXT NOT NULL CHECK (kind IN ('message', 'reservation')),
  user_id INTEGER NULL REFERENCES users (id),
  client_msg_id TEXT NULL CHECK (client_msg_id IS NULL OR length(client_msg_id) BETWEEN 1 AND 128),
  outbox_id INTEGER NULL,
  body TEXT NOT NULL CHECK (json_valid(body)),
  created_at INTEGER NOT NULL,
  UNIQUE (room, seq),
  UNIQUE (user_id, room, client_msg_id),
  UNIQUE (outbox_id, room),
  CHECK (
    (kind = 'message' AND user_id IS NOT NULL AND client_msg_id IS NOT NULL AND outbox_id IS NULL)
    OR (kind = 'reservation' AND user_id IS NULL AND client_msg_id IS NULL AND outbox_id IS NOT NULL))
);
CREATE INDEX rt_messages_retention ON rt_messages (room, created_at, seq);
