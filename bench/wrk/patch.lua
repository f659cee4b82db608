-- PATCH /v1/items/{id} (price) with ids drawn at random from BENCH_IDS.
-- The command line's headers (-H: the JWT row's Authorization) and the body's type.
local function json_headers()
  local headers = {["Content-Type"] = "application/json"}
  for name, value in pairs(wrk.headers) do headers[name] = value end
  return headers
end
local ids = {}
for line in io.lines(os.getenv("BENCH_IDS")) do ids[#ids + 1] = line end
math.randomseed(os.time() + tonumber(tostring(ids):match("0x(%x+)") or "0", 16))
request = function()
  local body = string.format('{"price": %d}', math.random(1, 999))
  return wrk.format("PATCH", "/v1/items/" .. ids[math.random(#ids)], json_headers(), body)
end
