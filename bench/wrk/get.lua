-- GET /v1/items/{id} with ids drawn at random from BENCH_IDS (one per line).
local ids = {}
for line in io.lines(os.getenv("BENCH_IDS")) do ids[#ids + 1] = line end
math.randomseed(os.time() + tonumber(tostring(ids):match("0x(%x+)") or "0", 16))
request = function()
  return wrk.format("GET", "/v1/items/" .. ids[math.random(#ids)])
end
