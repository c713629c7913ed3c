-- wrk script for the soak: one connection per thread, so a thread's requests and
-- responses strictly alternate and a request followed by another request (no
-- response between) was lost on that connection (reset, read error, refused).
-- Every request and response is written, with a wall-clock time, to
-- <out>/wrk-<thread>.log for bench/soak/soak.py to account for:
--   S <time> <path kind>          request written (a = /api, n = /ns, p = POST /api)
--   R <time> <status> <detail>    response: detail tag from the JSON body of non-2xx
-- Args (after --): <out dir> <delay ms between requests> <one in N requests to /ns>
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } soak_timespec;
int clock_gettime(int clk_id, soak_timespec *tp);
]]
local ts = ffi.new("soak_timespec")
local function now()
    ffi.C.clock_gettime(0, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local counter = 0
function setup(thread)
    thread:set("id", counter)
    counter = counter + 1
end

local out, delay_ms, ns_every, seq, log
function init(args)
    out = args[1] or "."
    delay_ms = tonumber(args[2] or "10")
    ns_every = tonumber(args[3] or "5")
    seq = 0
    log = assert(io.open(string.format("%s/wrk-%d.log", out, id), "w"))
    log:setvbuf("full")
end

function delay()
    return delay_ms
end

local post_body = '{"item":"soak","qty":1}'
local verified = false
function request()
    if id == 0 and not verified then
        -- wrk calls thread 0's request() once before any thread runs, to check the
        -- script: that request is never sent, so it is not recorded.
        verified = true
        return wrk.format("GET", "/api/verify")
    end
    seq = seq + 1
    local kind, req
    if seq % ns_every == 0 then
        kind = "n"
        req = wrk.format("GET", "/ns/item/" .. seq)
    elseif seq % 7 == 0 then
        kind = "p"
        req = wrk.format("POST", "/api/orders", { ["Content-Type"] = "application/json" }, post_body)
    else
        kind = "a"
        req = wrk.format("GET", "/api/item/" .. seq)
    end
    log:write(string.format("S %.6f %s\n", now(), kind))
    return req
end

local details = {
    ['"detail":"upstream unavailable"'] = "unavailable",
    ['"detail":"upstream timeout"'] = "timeout",
    ['"detail":"circuit open"'] = "circuit",
    ['"detail":"overloaded"'] = "overloaded",
}
function response(status, headers, body)
    local tag = "-"
    if status >= 300 then
        tag = "other"
        for needle, name in pairs(details) do
            if body and body:find(needle, 1, true) then
                tag = name
                break
            end
        end
    end
    log:write(string.format("R %.6f %d %s\n", now(), status, tag))
end

function done(summary, latency, requests)
    -- done() runs in wrk's main Lua state, which never saw init()'s args.
    local f = io.open((os.getenv("SOAK_WRK_OUT") or ".") .. "/wrk-summary.txt", "w")
    if f then
        local e = summary.errors
        f:write(string.format("requests %d\nconnect %d\nread %d\nwrite %d\nstatus %d\ntimeout %d\n",
            summary.requests, e.connect, e.read, e.write, e.status, e.timeout))
        f:close()
    end
end
