-- The load of bench/nginx (issue 10), for wrk 4: two workloads, chosen by the first script argument.
--
--     BENCH_WRK_MODE=get  BENCH_WRK_SETUP=FILE BENCH_WRK_TAG=T wrk -t2 -c32 -d12s --timeout 10s -s wrk.lua URL
--     BENCH_WRK_MODE=flow BENCH_WRK_SETUP=FILE BENCH_WRK_TAG=T wrk -t2 -c32 -d12s --timeout 10s -s wrk.lua URL
--
-- The mode comes from the environment rather than from script arguments because wrk decides whether to
-- parse response bodies (and call response()) from the script's top level, before init() sees them: the
-- get mode must not define response() at all. The setup FILE is written by bench.py, one item a line: `host NAME` (sent as the Host header, so that the
-- rendered site's catch-all server does not close the connection), `user ID TOKEN` (a logged-in user and
-- its bearer token), `resource ID` (a resource of huge capacity). RUN_TAG makes the Idempotency-Keys of
-- this run unique across runs (BENCH_WRK_TAG).
--
-- get:  GET /v1/resources/{id} with a bearer token, cycling over the users and resources. The requests
--       are formatted once in init(): the load generator shares the 2 cores with what it measures, so it
--       does as little per request as it can. No response() callback (wrk then skips parsing bodies).
-- flow: reserve + pay. POST /v1/reservations with a fresh Idempotency-Key; its 201 answer queues the pay
--       request (POST /v1/reservations/{id}/pay, {"payment_method":"sandbox_ok"}, another fresh key, the
--       same user's token), which the next request() of this thread sends. wrk calls response() and then
--       request() on the same connection, so in practice each pay follows its reserve on the connection
--       that made it. A flow counts when the pay answers 200 with state PAID.
--
-- done() prints one line `BENCH_JSON {...}` with wrk's totals, latency percentiles (µs) and, for the
-- flow, the per-kind counts summed over the threads.

local threads = {}
local next_id = 0

function setup(thread)
    thread:set("tid", next_id)
    next_id = next_id + 1
    table.insert(threads, thread)
end

local mode = os.getenv("BENCH_WRK_MODE")
local tag = os.getenv("BENCH_WRK_TAG") or "run"
assert(mode == "get" or mode == "flow", "BENCH_WRK_MODE must be get or flow, not " .. tostring(mode))
local host
local users, resources = {}, {}
local by_uid = {}
local requests, i = {}, 0
local queue = {}
local seq = 0
-- Counters read by done() through thread:get (globals of the thread's Lua state).
reserved, paid, unparsed = 0, 0, 0
statuses = ""

local function read_setup(path)
    for line in io.lines(path) do
        local kind, a, b = line:match("^(%S+)%s+(%S+)%s*(%S*)$")
        if kind == "host" then
            host = a
        elseif kind == "user" then
            local u = { uid = a, token = b }
            table.insert(users, u)
            by_uid[a] = u
        elseif kind == "resource" then
            table.insert(resources, a)
        end
    end
    assert(host and #users > 0 and #resources > 0, "incomplete setup file " .. path)
end

function init(args)
    read_setup(assert(os.getenv("BENCH_WRK_SETUP"), "BENCH_WRK_SETUP: the setup file"))
    if mode == "get" then
        -- Each thread starts at a different user, so the threads' connections do not move in step.
        for k = 1, #users do
            local u = users[(k + tid * 7) % #users + 1]
            for _, r in ipairs(resources) do
                table.insert(requests, wrk.format("GET", "/v1/resources/" .. r,
                    { Host = host, Authorization = "Bearer " .. u.token }))
            end
        end
    end
end

local function bump(status)
    -- A short "status:count" list, enough to say what went wrong.
    local key = tostring(status)
    local found = false
    statuses = statuses:gsub(key .. ":(%d+)", function(n)
        found = true
        return key .. ":" .. (tonumber(n) + 1)
    end)
    if not found then
        statuses = statuses .. (statuses == "" and "" or ",") .. key .. ":1"
    end
end

local function flow_request()
    local pay = table.remove(queue)
    if pay then
        return pay
    end
    seq = seq + 1
    local u = users[(seq + tid * 7) % #users + 1]
    local r = resources[(seq * 13 + tid) % #resources + 1]
    return wrk.format("POST", "/v1/reservations", {
        Host = host,
        Authorization = "Bearer " .. u.token,
        ["Content-Type"] = "application/json",
        ["Idempotency-Key"] = tag .. "-" .. tid .. "-r" .. seq,
    }, '{"resource_id":' .. r .. ',"quantity":1}')
end

function request()
    if mode == "get" then
        i = i % #requests + 1
        return requests[i]
    end
    return flow_request()
end

local function flow_response(status, headers, body)
    if status == 201 then
        -- The reservation: its id and its owner's (top-level keys; "resource_id" does not match).
        local id = body:match('[{,]"id":(%d+)')
        local uid = body:match('[{,]"user_id":(%d+)')
        local u = uid and by_uid[uid]
        if not (id and u) then
            unparsed = unparsed + 1
            return
        end
        reserved = reserved + 1
        seq = seq + 1
        table.insert(queue, wrk.format("POST", "/v1/reservations/" .. id .. "/pay", {
            Host = host,
            Authorization = "Bearer " .. u.token,
            ["Content-Type"] = "application/json",
            ["Idempotency-Key"] = tag .. "-" .. tid .. "-p" .. seq,
        }, '{"payment_method":"sandbox_ok"}'))
    elseif status == 200 and body:find('"state":"PAID"', 1, true) then
        paid = paid + 1
    else
        -- Which request it answered is not known here; the path of a 4xx/5xx body would say, but
        -- the count and the status are what the report needs.
        if status == 200 then
            unparsed = unparsed + 1
        else
            bump(status)
        end
    end
end

if mode == "flow" then
    response = flow_response
end

function done(summary, latency, requests)
    local sum = { reserved = 0, paid = 0, unparsed = 0 }
    local codes = {}
    for _, t in ipairs(threads) do
        for k in pairs(sum) do
            sum[k] = sum[k] + (t:get(k) or 0)
        end
        local s = t:get("statuses") or ""
        for code, n in s:gmatch("(%d+):(%d+)") do
            codes[code] = (codes[code] or 0) + tonumber(n)
        end
    end
    local parts = {}
    local function add(k, v)
        table.insert(parts, string.format('"%s":%s', k, v))
    end
    add("requests", summary.requests)
    add("duration_us", summary.duration)
    add("bytes", summary.bytes)
    for _, k in ipairs({ "connect", "read", "write", "status", "timeout" }) do
        add("errors_" .. k, summary.errors[k])
    end
    add("latency_mean_us", string.format("%.1f", latency.mean))
    add("latency_max_us", latency.max)
    for _, p in ipairs({ 50, 90, 99, 99.9 }) do
        add("latency_p" .. tostring(p):gsub("%.", "_") .. "_us", latency:percentile(p))
    end
    for k, v in pairs(sum) do
        add(k, v)
    end
    local c = {}
    for code, n in pairs(codes) do
        table.insert(c, string.format('"%s":%d', code, n))
    end
    add("other_statuses", "{" .. table.concat(c, ",") .. "}")
    io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\n")
end
