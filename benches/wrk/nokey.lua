-- No Idempotency-Key: pass-through.
-- The same request for nginx and idemgate, so both pay the same Lua cost.
wrk.method = "POST"
wrk.body = '{"amount":100,"currency":"eur"}'
wrk.headers["Content-Type"] = "application/json"
