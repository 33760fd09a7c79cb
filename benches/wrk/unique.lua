-- A new Idempotency-Key on every request (a first request each time).
-- The same request for nginx and idemgate, so both pay the same Lua cost.
local n = 0
local prefix = tostring(math.random(1, 1e9)) .. "-" .. tostring(os.time())
wrk.method = "POST"
wrk.body = '{"amount":100,"currency":"eur"}'
request = function()
  n = n + 1
  return wrk.format(nil, "/v1/charges", {["Content-Type"] = "application/json", ["Idempotency-Key"] = prefix .. "-" .. n})
end
