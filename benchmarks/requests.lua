-- wrk script: cycle through many pre-built OCSP requests (GET paths or POST bodies).
--
-- The request file (env OCSP_BENCH_REQUESTS) holds records "<method> <len>\n<payload>":
-- for GET the payload is the path, for POST the DER body. Each thread starts at its own
-- offset and walks the list in order, so on-demand runs sign distinct serials.
-- done() prints one JSON line (prefixed "BENCH ") with counts and latency percentiles.

local requests = {}

-- OCSP_BENCH_NO_PROBE: skip wrk's connect-and-close probe of the address, which makes
-- `openssl ocsp` (3.0) spin forever on that connection (openssl/openssl#31129).
if os.getenv("OCSP_BENCH_NO_PROBE") then
  function wrk.resolve(host, service)
    wrk.addrs = wrk.lookup(host, service)
  end
end
local counter = 1
local threads = {}

local function load(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  local list = {}
  local pos = 1
  while pos <= #data do
    local nl = string.find(data, "\n", pos, true)
    local method, len = string.match(string.sub(data, pos, nl - 1), "^(%u+) (%d+)$")
    len = tonumber(len)
    local payload = string.sub(data, nl + 1, nl + len)
    pos = nl + len + 1
    if method == "GET" then
      list[#list + 1] = wrk.format("GET", payload, {["Host"] = "127.0.0.1"})
    else
      list[#list + 1] = wrk.format("POST", "/", {
        ["Host"] = "127.0.0.1",
        ["Content-Type"] = "application/ocsp-request",
      }, payload)
    end
  end
  return list
end

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  requests = load(os.getenv("OCSP_BENCH_REQUESTS"))
  local nthreads = tonumber(os.getenv("OCSP_BENCH_THREADS") or "1")
  index = math.floor((#requests / nthreads) * (id - 1))
end

function request()
  index = index + 1
  if index > #requests then index = 1 end
  return requests[index]
end

function done(summary, latency, requests_)
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean))
end
