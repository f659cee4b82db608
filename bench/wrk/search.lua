-- GET /v1/items?q=<word> with a word drawn from the seeding vocabulary.
local words = {"amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "ivory", "jade"}
math.randomseed(os.time() + tonumber(tostring(words):match("0x(%x+)") or "0", 16))
request = function()
  return wrk.format("GET", "/v1/items?per_page=20&q=" .. words[math.random(#words)] .. math.random(0, 99))
end
