-- POST /v1/items with a fresh name each time.
local n = 0
local tag = tostring({}):match("0x(%x+)") or "t"
request = function()
  n = n + 1
  local body = string.format('{"name": "bench %s %d", "description": "created under load", "price": %d.50}', tag, n, n % 900)
  return wrk.format("POST", "/v1/items", {["Content-Type"] = "application/json"}, body)
end
