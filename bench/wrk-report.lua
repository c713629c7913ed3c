-- Prints one JSON line (prefixed "JSON ") with wrk's totals and latency
-- percentiles in microseconds, for bench/run.sh to collect.
-- WRK_METHOD (e.g. POST) sets the request method; the default is GET.
local method = os.getenv("WRK_METHOD")
if method and method ~= "" then
  wrk.method = method
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
