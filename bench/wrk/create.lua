-- POST /v1/items with a fresh name each time.
-- The command line's headers (-H: the JWT row's Authorization) and the body's type.
local function json_headers()
  local headers = {["Content-Type"] = "application/json"}
  for name, value in pairs(wrk.headers) do headers[name] = value end
  return headers
end
local n = 0
local tag = tostring({}):match("0x(%x+)") or "t"
request = function()
  n = n + 1
  local body = string.format('{"name": "bench %s %d", "description": "created under load", "price": %d.50}', tag, n, n % 900)
  return wrk.format("POST", "/v1/items", json_headers(), body)
end
