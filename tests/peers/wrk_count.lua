-- wrk script for the sockmesh routing tests: prints the run's summary as one JSON line, so a
-- test can count what was answered and how.
--   wrk -t2 -c8 -d3s -s wrk_count.lua http://10.96.0.10:8080/
--   {"requests":10000,"non_2xx":0,"connect":0,"read":0,"write":0,"timeout":0,"duration_us":...}
-- `requests` counts completed responses; the errors are wrk's own counters (non-2xx/3xx status,
-- socket connect/read/write errors, time-outs).

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests":%d,"non_2xx":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,"duration_us":%d}\n',
    summary.requests, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, summary.duration))
end
