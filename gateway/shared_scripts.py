"""What the gateways keep in Redis (or Valkey): the key names, and the Lua scripts that claim a frame,
take a dead gateway's claim over and move a counter forward, each atomically in one bin's slot.

Key names (prefix default "binlink"); a bin's keys carry its id as a hash tag, so in a Redis
Cluster they share one slot and the claim script touches one slot only:

  <prefix>:{<device>}:ctr                hash  epoch, key_id, fcnt: the last counter the fleet accepted
  <prefix>:{<device>}:seen:<epoch>:<fcnt> string digest of the frame, SET NX with a TTL: the claim
  <prefix>:{<device>}:bin                hash  epoch, fcnt, fill, flags of the bin's newest reading: events
                                               (emptied, full) compare with the fleet's last reading
  <prefix>:{<device>}:device             string the registry entry, sealed (shared_trust.py; holds the key:
                                               protect Redis by ACL/TLS)
  <prefix>:devices / :retired / :ids     set / hash / set: registry index, retired ids (sealed), ids ever claimed
  <prefix>:registry:version              integer raised on every registry change: gateways poll it
  <prefix>:reconciled:<gateway>          "1": this gateway pushed its counters since Redis last lost its data"""


class Keys:
    """The key names above, under one prefix."""

    def __init__(self, prefix):
        self.prefix = prefix

    def bin(self, device_id, what):
        """A key of one bin ("ctr", "bin", "device", "seen:<epoch>:<fcnt>"), in the bin's slot."""
        return "%s:{%06x}:%s" % (self.prefix, device_id, what)

    def fleet(self, what):
        """A key of the whole fleet ("devices", "retired", "ids", "registry:version", "reconciled:<gateway>")."""
        return "%s:%s" % (self.prefix, what)


# Every value the scripts read back from Redis is checked before use: a value that is not a
# 32-bit counter, or a claim that is not "<digest>:p:<gateway>" / "<digest>:c", is not trusted and is
# overwritten; the scripts then say which kind they refused (counted by the gateway).
UINT = """
local function uint(s)
  local n = tonumber(s)
  if n and n >= 0 and n <= 4294967295 and n == math.floor(n) then return n end
end
"""

# A frame's claim, atomically in the bin's slot. ARGV: epoch, key_id, fcnt, digest, ttl, gateway,
# the frame's newest reading (fcnt, fill or '', flags; '' '' '' for a hello), which becomes the
# bin's state if newer, and MAX_FCNT_GAP. The claim returns the state before it, for the events
# (emptied, full). The claim holds "<digest>:p:<gateway>" (pending) until the claimer's outbox
# holds the reading, then "<digest>:c" (confirm). ok: this gateway publishes it; pending /
# duplicate: another gateway claimed these very bytes (pending: not yet on its disk); replay: a
# counter the fleet already accepted; stale_key: a key older than the fleet's.
# A fleet counter more than MAX_FCNT_GAP above a frame this gateway verified against its own
# counter is not trusted (a Redis writer would lock the bin out): the frame's counter replaces it.
# A claim above the fleet's counter was not made by a claim (which raises the counter): not trusted.
CLAIM = UINT + """
local epoch, fcnt, gap = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[10])
local seen = redis.call('GET', KEYS[2])
local d = string.len(ARGV[4])
if seen and string.sub(seen, 1, d + 1) == ARGV[4] .. ':' then
  local mark = string.sub(seen, d + 2)
  if string.sub(mark, 1, 2) == 'p:' then return 'pending' end
  if mark == 'c' then return 'duplicate' end
end
local refused = ''
local cur = redis.call('HMGET', KEYS[1], 'epoch', 'fcnt')
local e, c = uint(cur[1]), uint(cur[2])
if cur[1] and not (e and c) then refused, e = 'counter', nil end
if e and epoch < e then return 'stale_key' end
if e == epoch and c - fcnt > gap then refused, e = 'counter_ahead', nil end
if e == epoch and fcnt <= c then return 'replay' end
if seen and refused == '' then refused = 'claim' end
redis.call('SET', KEYS[2], ARGV[4] .. ':p:' .. ARGV[6], 'EX', ARGV[5])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'key_id', ARGV[2], 'fcnt', ARGV[3])
local bin = redis.call('HMGET', KEYS[3], 'epoch', 'fcnt', 'fill', 'flags')
local be, bf = uint(bin[1]), uint(bin[2])
if ARGV[7] ~= '' then
  if not (be and bf) or epoch > be or (epoch == be and tonumber(ARGV[7]) > bf) then
    local fill = ARGV[8]
    if fill == '' and be == epoch and tonumber(bin[3]) then fill = bin[3] end
    redis.call('HSET', KEYS[3], 'epoch', ARGV[1], 'fcnt', ARGV[7], 'fill', fill, 'flags', ARGV[9])
  end
end
return {'ok', bin[1], bin[2], bin[3], bin[4], refused}
"""

# A claim still pending after its claimer had time to commit: that gateway died in between
# (SIGKILL, power cut). A peer that heard the same bytes takes the claim over. ARGV: digest, gateway.
TAKEOVER = """
local seen = redis.call('GET', KEYS[1])
if not seen or string.sub(seen, 1, string.len(ARGV[1]) + 2) ~= ARGV[1] .. ':p' then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. ':p:' .. ARGV[2], 'KEEPTTL')
return 1
"""

# Reconciliation after an outage: a counter only ever moves forward (or to a newer key); a stored
# counter that is not one is replaced.
ADVANCE = UINT + """
local e, c = uint(redis.call('HGET', KEYS[1], 'epoch')), uint(redis.call('HGET', KEYS[1], 'fcnt'))
local epoch, fcnt = tonumber(ARGV[1]), tonumber(ARGV[3])
if e and c and (epoch < e or (epoch == e and fcnt <= c)) then return 0 end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'key_id', ARGV[2], 'fcnt', ARGV[3])
return 1
"""

