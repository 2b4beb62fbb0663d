-- wrk script for `cargo xtask bench`: a Matrix-client-like request head (~480 bytes with the
-- request line) carrying an access token, and a machine-readable summary at the end.
-- Everything is static, so wrk builds the request once (no per-request Lua).

wrk.method = "GET"
wrk.headers["Host"] = "matrix.bench.example"
wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Element/1.11.85 Chrome/128.0 Safari/537.36"
wrk.headers["Accept"] = "application/json"
wrk.headers["Accept-Language"] = "fr-FR,fr;q=0.9,en-US;q=0.8,en;q=0.7"
wrk.headers["Accept-Encoding"] = "identity"
wrk.headers["Authorization"] = "Bearer syt_YmVuY2g_bnVNTkXpWdKqzmDGcHbF_1c9XkZ"
wrk.headers["Origin"] = "https://app.bench.example"
wrk.headers["Referer"] = "https://app.bench.example/"
wrk.headers["Sec-Fetch-Mode"] = "cors"
wrk.headers["Sec-Fetch-Site"] = "same-site"
wrk.headers["Connection"] = "keep-alive"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d p50_us=%d p99_us=%d mean_us=%.1f max_us=%d errors=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max,
    e.connect + e.read + e.write + e.status + e.timeout))
end
