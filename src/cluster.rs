//! Backend slots shared by replicas through Redis (`max_concurrency_scope:
//! cluster`): two load balancers in front of one-job bots must not give a
//! bot two jobs.
//!
//! Each backend of a cluster-scoped upstream has a sorted set in Redis whose
//! members are the slots taken on it, scored by when their lease runs out
//! (Redis's own clock, so replicas' clocks do not matter). A pick sends the
//! policy's candidates, in its order, to one script that drops expired slots
//! and takes the first candidate with room: one round trip per pick. A
//! replica renews the leases of the slots it holds every third of `lease`;
//! the slots of a replica that stops (SIGKILL, partition) lapse after
//! `lease`, and one that comes back learns from the renewal which of its
//! slots had lapsed (they are counted and registered again: the jobs on them
//! are still running). A released slot is removed and announced on the
//! upstream's channel, which wakes the first waiter of every replica; each
//! queue's first waiter also looks again every second (the runtime's
//! housekeeping tick), in case an announcement was lost.
//!
//! While Redis cannot be reached, picks follow `on_unavailable`: `local`
//! counts on this replica alone (the slots so taken are registered when Redis
//! is back, so they are not handed out twice then), `refuse` answers 503.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use crate::config::{ClusterConfig, OnUnavailable};
use crate::metrics::series::DurationHistogram;
use crate::queue::WaitQueue;

/// Releases waiting to be sent; more only pile up while Redis is away, and
/// those are dropped (their slots lapse).
const MAX_PENDING_RELEASES: usize = 65_536;

/// How long a request waits for Redis to answer its rate limit, at most
/// (less with a short `lease`), before its replica's own bucket decides.
const RATE_LIMIT_TIMEOUT: Duration = Duration::from_millis(250);

/// After Redis failed a rate limit, requests use their replica's buckets
/// this long before one asks Redis again.
const RATE_LIMIT_RETRY: Duration = Duration::from_secs(1);

/// At most this many candidates go to Redis per pick.
pub const MAX_CANDIDATES: usize = 16;

/// Takes a slot on the first candidate with room, unless a request of a
/// better priority class waits on another replica; notes this replica's
/// waiting class when it takes nothing.
/// KEYS: the upstream's waiting set, its start mark, then the candidates'
/// slot sets in the policy's order.
/// ARGV: lease (ms), the new slot's member, the request's class (0 high,
/// 1 normal, 2 low), this replica, how long a waiting note holds (ms), how
/// long picks wait after Redis starts empty (ms), then each candidate's limit.
/// Returns the taken candidate's position, -1 when all are full, -2 when it
/// gave way to a better class elsewhere, -3 while Redis has just started
/// empty (a restart without persistence lost every slot: the replicas add
/// back the slots of their running jobs at their next renewal, which comes
/// before the wait ends).
///
/// The waiting set scores each replica's best waiting class and when that
/// note lapses together, as class x 10^13 + expiry (ms): exact in a double.
const ACQUIRE: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local started = redis.call('GET', KEYS[2])
if not started then
  redis.call('SET', KEYS[2], now + tonumber(ARGV[6]))
  return -3
end
if now < tonumber(started) then
  return -3
end
local lease = tonumber(ARGV[1])
local class = tonumber(ARGV[3])
local replica = ARGV[4]
local note = tonumber(ARGV[5])
local scale = 10000000000000
local waiting = KEYS[1]
local gave_way = false
if class > 0 then
  local better = redis.call('ZRANGEBYSCORE', waiting, 0, class * scale - 1, 'WITHSCORES')
  for i = 1, #better, 2 do
    if better[i] ~= replica and tonumber(better[i + 1]) % scale > now then
      gave_way = true
      break
    end
  end
end
-- Sent again after a dropped connection, the script may have run already:
-- the slot it took then is the answer.
for i = 3, #KEYS do
  if redis.call('ZSCORE', KEYS[i], ARGV[2]) then
    return i - 3
  end
end
if not gave_way then
  for i = 3, #KEYS do
    local key = KEYS[i]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) < tonumber(ARGV[i + 4]) then
      redis.call('ZADD', key, now + lease, ARGV[2])
      redis.call('PEXPIRE', key, 2 * lease)
      local mine = redis.call('ZSCORE', waiting, replica)
      if mine and math.floor(tonumber(mine) / scale) == class then
        redis.call('ZREM', waiting, replica)
      end
      return i - 3
    end
  end
end
local mine = redis.call('ZSCORE', waiting, replica)
if (not mine) or tonumber(mine) % scale <= now or math.floor(tonumber(mine) / scale) >= class then
  redis.call('ZADD', waiting, class * scale + now + note, replica)
end
redis.call('PEXPIRE', waiting, 2 * note)
if gave_way then
  return -2
end
return -1
";

/// How long a replica's note that it has a request of some class waiting
/// holds without being renewed (every failed pick renews it; a queue's first
/// waiter tries at least every second).
const WAITING_NOTE: Duration = Duration::from_secs(2);

/// Extends the leases of the slots a replica holds, adding back any that
/// lapsed (or were taken while Redis was away).
/// KEYS: each held slot's set. ARGV: lease (ms), then each slot's member.
/// Returns the positions of the slots that were not there, or had lapsed
/// (a lapsed slot another pick has not yet swept is lapsed all the same).
const RENEW: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local lease = tonumber(ARGV[1])
local missing = {}
for i, key in ipairs(KEYS) do
  local expiry = redis.call('ZSCORE', key, ARGV[i + 1])
  if (not expiry) or tonumber(expiry) <= now then
    table.insert(missing, i - 1)
  end
  redis.call('ZADD', key, now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, 2 * lease)
end
return missing
";

/// How many unexpired slots each set holds. KEYS: the sets.
const COUNT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local counts = {}
for i, key in ipairs(KEYS) do
  counts[i] = redis.call('ZCOUNT', key, '(' .. now, '+inf')
end
return counts
";

/// One token from a bucket of a route's `rate_limit` with `scope: cluster`,
/// as GCRA: the bucket holds its theoretical arrival time, on Redis's
/// clock, in microseconds, and lapses when it would be full again.
/// KEYS: the bucket. ARGV: the emission interval and the burst tolerance
/// (interval x (burst - 1)), in microseconds.
/// Returns 0 when a token was taken, else the microseconds until one is there.
const TAKE_TOKEN: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return wait end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
return 0
";

/// The Redis link of one process, shared by its cluster-scoped upstreams.
pub struct Cluster {
    config: ClusterConfig,
    /// This process in slot members: random, new at every start.
    replica: String,
    client: redis::Client,
    commands: ConnectionManager,
    /// How long one command may take before Redis counts as unreachable.
    command_timeout: Duration,
    acquire: redis::Script,
    renew: redis::Script,
    count: redis::Script,
    take_token: redis::Script,
    available: AtomicBool,
    /// Rate limits ask Redis again from this moment (`clock` nanoseconds; 0:
    /// it answers). Apart from `available`: a rate limit's failed check never
    /// turns slots to `on_unavailable`, and slots' outages do not stop it
    /// from trying.
    rate_limits_retry_at: AtomicU64,
    held: Mutex<HashMap<u64, HeldSlot>>,
    next_slot: AtomicU64,
    releases: mpsc::Sender<Release>,
    /// Wakes the renewal loop: a command failed (probe at the outage pace at
    /// once, not at the end of a lease pause), or the announcement link
    /// dropped (Redis may have restarted empty).
    renew_now: Arc<tokio::sync::Notify>,
    /// The wait queue of each cluster-scoped upstream, by its channel.
    queues: Mutex<HashMap<Arc<str>, Weak<WaitQueue>>>,
    pub stats: ClusterStats,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

struct HeldSlot {
    key: Arc<str>,
    channel: Arc<str>,
    /// False for a slot taken by local limits while Redis was unreachable,
    /// until a renewal has added it.
    registered: bool,
}

struct Release {
    key: Arc<str>,
    member: String,
    channel: Arc<str>,
}

/// What `/status` and `/metrics` show of the link.
#[derive(Default)]
pub struct ClusterStats {
    /// Each acquire's round trip.
    pub round_trips: DurationHistogram,
    pub renewals_ok: AtomicU64,
    pub renewals_failed: AtomicU64,
    /// Picks made by local limits, or refused, while Redis was unreachable.
    pub fallbacks: AtomicU64,
    /// Slots found missing at a renewal and added back (Redis restarted empty,
    /// or the replica was cut off for longer than `lease`).
    pub slots_lost: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// An upstream's keys: its channel, its waiting set, and each backend's
/// slot set by index.
#[derive(Debug, Clone)]
pub struct UpstreamSlots {
    pub cluster: Arc<Cluster>,
    pub channel: Arc<str>,
    pub waiting: Arc<str>,
    /// Set at the first pick after Redis started empty (see `ACQUIRE`).
    pub started: Arc<str>,
    pub keys: Vec<Arc<str>>,
}

/// A slot held on a backend; released (in Redis, without waiting) when dropped.
pub struct SlotLease {
    cluster: Arc<Cluster>,
    slot: u64,
    key: Arc<str>,
    channel: Arc<str>,
}

impl std::fmt::Debug for SlotLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotLease({} #{})", self.key, self.slot)
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cluster({}, replica {})", self.config.redis_shown(), self.replica)
    }
}

/// Redis could not be asked (down, unreachable, too slow).
#[derive(Debug)]
pub struct Unreachable;

impl Cluster {
    /// Connects lazily (a Redis that is down at start leaves the proxy
    /// serving by `on_unavailable`) and starts the renewal, release and
    /// announcement tasks on the current runtime.
    pub fn start(config: &ClusterConfig) -> Result<Arc<Cluster>, String> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(config.redis.reveal())
            .map_err(|_| "cluster redis is not a usable URL".to_owned())?;
        if let Some(password) = &config.password {
            let settings = info.redis_settings().clone().set_password(password.reveal());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(|_| "cluster redis is not a usable URL".to_owned())?;
        let command_timeout = (config.lease / 4).min(Duration::from_secs(1));
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(command_timeout))
            .set_response_timeout(Some(command_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|error| format!("cannot set up the Redis connection: {error}"))?;
        let (releases, released) = mpsc::channel(MAX_PENDING_RELEASES);
        let cluster = Arc::new(Cluster {
            config: config.clone(),
            replica: format!("{:016x}", fastrand::u64(..)),
            client,
            commands,
            command_timeout,
            acquire: redis::Script::new(ACQUIRE),
            renew: redis::Script::new(RENEW),
            count: redis::Script::new(COUNT),
            take_token: redis::Script::new(TAKE_TOKEN),
            rate_limits_retry_at: AtomicU64::new(0),
            // Until the first renewal says otherwise: a first pick finds out.
            available: AtomicBool::new(true),
            held: Mutex::default(),
            next_slot: AtomicU64::new(0),
            releases,
            renew_now: Arc::default(),
            queues: Mutex::default(),
            stats: ClusterStats::default(),
            tasks: Mutex::default(),
        });
        // The release task is not aborted with the link: it ends when the
        // last lease is gone and its release sent (the channel closes).
        tokio::spawn(send_releases(cluster.commands.clone(), command_timeout, released));
        let tasks = vec![
            tokio::spawn(renew_leases(Arc::downgrade(&cluster), Arc::clone(&cluster.renew_now))).abort_handle(),
            tokio::spawn(follow_announcements(Arc::downgrade(&cluster))).abort_handle(),
        ];
        *cluster.tasks.lock().expect("never poisoned") = tasks;
        Ok(cluster)
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn available(&self) -> bool {
        self.available.load(Ordering::Acquire)
    }

    pub fn held_slots(&self) -> usize {
        self.held.lock().expect("never poisoned").len()
    }

    /// The keys of `upstream` with these backend addresses; its queue, if
    /// any, is woken by the announcements of slots freed on other replicas.
    pub fn upstream(
        self: &Arc<Self>,
        upstream: &str,
        backends: &[&str],
        queue: Option<&Arc<WaitQueue>>,
    ) -> UpstreamSlots {
        let channel: Arc<str> = format!("{}{{{upstream}}}:freed", self.config.key_prefix).into();
        if let Some(queue) = queue {
            let mut queues = self.queues.lock().expect("never poisoned");
            queues.retain(|_, queue| queue.strong_count() > 0);
            queues.insert(Arc::clone(&channel), Arc::downgrade(queue));
        }
        // A bot's slots are keyed by its address alone: listed in two
        // upstreams, or in one that is renamed, it is still one bot.
        let keys = backends.iter().map(|address| format!("{}slots:{address}", self.config.key_prefix).into()).collect();
        let waiting = format!("{}{{{upstream}}}:waiting", self.config.key_prefix).into();
        let started = format!("{}{{{upstream}}}:started", self.config.key_prefix).into();
        UpstreamSlots { cluster: Arc::clone(self), channel, waiting, started, keys }
    }

    /// Takes a slot on the first of `candidates` (backend index and its
    /// `max_concurrency`, in the policy's order) with room across the
    /// cluster, for a request of priority `class` (0 high, 1 normal, 2 low):
    /// `Ok(None)` when all are full, or when a request of a better class
    /// waits on another replica (it goes first).
    pub async fn acquire(
        self: &Arc<Self>,
        slots: &UpstreamSlots,
        candidates: &[(usize, u32)],
        class: u8,
    ) -> Result<Option<(usize, SlotLease)>, Unreachable> {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let member = self.member(slot);
        let mut invocation = self.acquire.prepare_invoke();
        invocation.arg(self.lease_millis()).arg(&member).arg(class).arg(&self.replica);
        invocation.arg(WAITING_NOTE.as_millis() as u64).arg(self.recovery_window().as_millis() as u64);
        invocation.key(&*slots.waiting).key(&*slots.started);
        for &(index, _) in candidates {
            invocation.key(&*slots.keys[index]);
        }
        for &(_, limit) in candidates {
            invocation.arg(limit);
        }
        // Until an answer comes, whatever the script took is given back if
        // this pick ends: an error, or the client leaving while it waits.
        let mut unanswered = Unanswered { cluster: self, slots, candidates, member: &member, answered: false };
        let started = Instant::now();
        let answer = self.run::<i64>(&invocation).await;
        self.stats.round_trips.record(started.elapsed());
        let position = match answer {
            Ok(position) => position,
            Err(error) => {
                self.lost_contact(&error);
                return Err(Unreachable);
            }
        };
        unanswered.answered = true;
        let Some(&(index, _)) = usize::try_from(position).ok().and_then(|p| candidates.get(p)) else {
            return Ok(None);
        };
        Ok(Some((index, self.hold(slot, Arc::clone(&slots.keys[index]), Arc::clone(&slots.channel), true))))
    }

    /// A token from the shared bucket `bucket` of route `route`'s rate limit
    /// (a token every `interval`, `burst` at once): `Ok(None)` when taken,
    /// `Ok(Some(wait))` when the bucket is empty for `wait` more.
    pub async fn take_token(
        &self,
        route: &str,
        bucket: &str,
        interval: Duration,
        burst: u32,
    ) -> Result<Option<Duration>, Unreachable> {
        let key = format!("{}ratelimit:{{{route}}}:{bucket}", self.config.key_prefix);
        // Rounded up: never more requests than the limit says.
        let interval_micros = u64::try_from(interval.as_nanos().div_ceil(1000)).unwrap_or(u64::MAX);
        let mut invocation = self.take_token.prepare_invoke();
        invocation
            .key(key)
            .arg(interval_micros)
            .arg(interval_micros.saturating_mul(u64::from(burst.saturating_sub(1))));
        let bound = RATE_LIMIT_TIMEOUT.min(self.command_timeout);
        let answer = tokio::time::timeout(bound, self.run::<u64>(&invocation)).await;
        match answer.unwrap_or_else(|_| Err("no answer in time".to_owned())) {
            Ok(wait) => {
                if self.rate_limits_retry_at.swap(0, Ordering::AcqRel) != 0 {
                    tracing::info!(redis = %self.config.redis_shown(), "Redis answers rate limits again: they hold across the cluster");
                }
                Ok((wait > 0).then(|| Duration::from_micros(wait)))
            }
            Err(error) => {
                let retry_at = crate::clock::nanos_since_epoch() + RATE_LIMIT_RETRY.as_nanos() as u64;
                if self.rate_limits_retry_at.swap(retry_at, Ordering::AcqRel) == 0 {
                    tracing::warn!(redis = %self.config.redis_shown(), %error,
                        "Redis did not answer a rate limit: each replica holds rate limits with its own buckets until it does");
                }
                Err(Unreachable)
            }
        }
    }

    /// Whether rate limits ask Redis now: it answered the last one, or the
    /// pause after a failure is over.
    pub fn rate_limits_shared(&self) -> bool {
        let retry_at = self.rate_limits_retry_at.load(Ordering::Acquire);
        retry_at == 0 || crate::clock::nanos_since_epoch() >= retry_at
    }

    /// The slots taken on each backend of `slots` across the cluster, for
    /// `/status`; `None` when Redis cannot be asked.
    pub async fn slots_in_use(&self, slots: &UpstreamSlots) -> Option<Vec<u64>> {
        if slots.keys.is_empty() || !self.available() {
            return None;
        }
        let mut invocation = self.count.prepare_invoke();
        for key in &slots.keys {
            invocation.key(&**key);
        }
        let mut connection = self.commands.clone();
        tokio::time::timeout(self.command_timeout, invocation.invoke_async::<Vec<u64>>(&mut connection))
            .await
            .ok()?
            .ok()
    }

    /// A slot taken by this replica's own limits while Redis is unreachable:
    /// registered in Redis by the first renewal that reaches it.
    pub fn hold_locally(self: &Arc<Self>, slots: &UpstreamSlots, index: usize) -> SlotLease {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        self.hold(slot, Arc::clone(&slots.keys[index]), Arc::clone(&slots.channel), false)
    }

    /// A pick refused under `on_unavailable: refuse`.
    pub fn refused(&self) {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    pub fn on_unavailable(&self) -> OnUnavailable {
        self.config.on_unavailable
    }

    fn hold(self: &Arc<Self>, slot: u64, key: Arc<str>, channel: Arc<str>, registered: bool) -> SlotLease {
        let entry = HeldSlot { key: Arc::clone(&key), channel: Arc::clone(&channel), registered };
        self.held.lock().expect("never poisoned").insert(slot, entry);
        SlotLease { cluster: Arc::clone(self), slot, key, channel }
    }

    /// Runs a script within `command_timeout`, once more if the connection
    /// had dropped (a Redis restart, an idle cut): the connection manager has
    /// reconnected by then, and one dropped connection is not an outage.
    async fn run<T: redis::FromRedisValue>(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<T, String> {
        let attempt = async {
            let mut connection = self.commands.clone();
            match invocation.invoke_async::<T>(&mut connection).await {
                Err(error) if error.is_connection_dropped() => invocation.invoke_async::<T>(&mut connection).await,
                answer => answer,
            }
        };
        match tokio::time::timeout(self.command_timeout, attempt).await {
            Ok(answer) => answer.map_err(|error| error.to_string()),
            Err(_) => Err(format!("no answer within {}", crate::health::describe(self.command_timeout))),
        }
    }

    /// How often the renewal loop tries while Redis is unreachable: at least
    /// six times a lease, so that a short lease's slots are renewed before
    /// they lapse once Redis is back.
    fn outage_pause(&self) -> Duration {
        (self.config.lease / 6).min(Duration::from_millis(500))
    }

    /// How long picks wait after Redis started empty. A replica learns of a
    /// restart the moment its announcement link drops, and renews at once
    /// (or, while Redis is still down, at the outage pace): the wait covers
    /// that pace and one answer, so every replica's running jobs are back
    /// before any bot is handed out.
    fn recovery_window(&self) -> Duration {
        self.outage_pause() + self.command_timeout
    }

    fn member(&self, slot: u64) -> String {
        format!("{}:{slot}", self.replica)
    }

    fn lease_millis(&self) -> u64 {
        self.config.lease.as_millis() as u64
    }

    fn send_release(&self, key: Arc<str>, member: String, channel: Arc<str>) {
        // Full only while Redis is away and releases pile up: a release not
        // sent leaves its slot unrenewed, and it lapses with its lease.
        let _ = self.releases.try_send(Release { key, member, channel });
    }

    fn lost_contact(&self, error: &str) {
        *self.stats.last_error.lock().expect("never poisoned") = Some(error.to_owned());
        if self.available.swap(false, Ordering::AcqRel) {
            self.renew_now.notify_one();
            match self.config.on_unavailable {
                OnUnavailable::Local => tracing::error!(redis = %self.config.redis_shown(), %error,
                    "Redis is unreachable: max_concurrency now holds per replica only, until it is back"),
                OnUnavailable::Refuse => tracing::error!(redis = %self.config.redis_shown(), %error,
                    "Redis is unreachable: cluster-scoped upstreams answer 503 until it is back"),
            }
        }
    }

    /// One renewal of every held slot. Returns whether Redis answered.
    async fn renew_once(&self) -> bool {
        let held: Vec<(u64, Arc<str>, Arc<str>, bool)> = self
            .held
            .lock()
            .expect("never poisoned")
            .iter()
            .map(|(slot, held)| (*slot, Arc::clone(&held.key), Arc::clone(&held.channel), held.registered))
            .collect();
        let mut invocation = self.renew.prepare_invoke();
        invocation.arg(self.lease_millis());
        for (slot, key, _, _) in &held {
            invocation.key(&**key).arg(self.member(*slot));
        }
        let missing = match self.run::<Vec<usize>>(&invocation).await {
            Ok(missing) => missing,
            Err(error) => {
                self.stats.renewals_failed.fetch_add(1, Ordering::Relaxed);
                self.lost_contact(&error);
                return false;
            }
        };
        self.stats.renewals_ok.fetch_add(1, Ordering::Relaxed);
        let mut current = self.held.lock().expect("never poisoned");
        // A slot released while the renewal was on its way may have been
        // added back by it: released again, and not counted as lost.
        for (slot, key, channel, _) in held.iter().filter(|(slot, ..)| !current.contains_key(slot)) {
            self.send_release(Arc::clone(key), self.member(*slot), Arc::clone(channel));
        }
        let lost = missing
            .iter()
            .filter_map(|&position| held.get(position))
            .filter(|(slot, _, _, registered)| *registered && current.contains_key(slot))
            .count();
        if lost > 0 {
            self.stats.slots_lost.fetch_add(lost as u64, Ordering::Relaxed);
            tracing::warn!(
                lost,
                "slots of this replica were missing in Redis (it restarted empty, or this replica was cut off for \
                 longer than the lease); added back: their jobs are still running"
            );
        }
        for (slot, ..) in &held {
            if let Some(entry) = current.get_mut(slot) {
                entry.registered = true;
            }
        }
        true
    }
}

/// A pick's script sent but not answered (see [`Cluster::acquire`]).
struct Unanswered<'a> {
    cluster: &'a Cluster,
    slots: &'a UpstreamSlots,
    candidates: &'a [(usize, u32)],
    member: &'a str,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            for &(index, _) in self.candidates {
                let key = Arc::clone(&self.slots.keys[index]);
                self.cluster.send_release(key, self.member.to_owned(), Arc::clone(&self.slots.channel));
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for task in self.tasks.lock().expect("never poisoned").drain(..) {
            task.abort();
        }
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.cluster.held.lock().expect("never poisoned").remove(&self.slot);
        let member = self.cluster.member(self.slot);
        self.cluster.send_release(Arc::clone(&self.key), member, Arc::clone(&self.channel));
    }
}

/// Renews every third of the lease; while Redis is unreachable, tries at the
/// outage pace (see [`Cluster::outage_pause`]), and on its return registers the
/// slots taken meanwhile before picks go back to Redis.
async fn renew_leases(cluster: Weak<Cluster>, renew_now: Arc<tokio::sync::Notify>) {
    loop {
        let Some(strong) = cluster.upgrade() else { return };
        let was_available = strong.available();
        let answered = strong.renew_once().await;
        if answered && !was_available {
            // Slots taken by local limits until the flag flips are in the
            // next renewal, at once rather than a third of a lease later.
            strong.available.store(true, Ordering::Release);
            strong.renew_once().await;
            let held = strong.held_slots();
            tracing::info!(redis = %strong.config.redis_shown(), held,
                "Redis is reachable again: max_concurrency holds across the cluster");
        }
        let pause = if strong.available() { strong.config.lease / 3 } else { strong.outage_pause() };
        // A failed command or a dropped link cuts the pause short.
        drop(strong);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = renew_now.notified() => {}
        }
    }
}

/// Sends released slots to Redis, several per round trip when they pile up,
/// and announces each on its upstream's channel. A release that cannot be
/// sent is dropped: its slot is no longer renewed and lapses with its lease.
/// Ends when every sender (the link and its leases) is gone and the channel
/// drained, so the last leases of a link a reload replaced are released too.
async fn send_releases(commands: ConnectionManager, timeout: Duration, mut released: mpsc::Receiver<Release>) {
    let mut batch = Vec::new();
    while released.recv_many(&mut batch, 256).await > 0 {
        let mut pipeline = redis::pipe();
        for release in &batch {
            pipeline.zrem(&*release.key, &release.member).ignore().publish(&*release.channel, "").ignore();
        }
        let mut connection = commands.clone();
        let sent = tokio::time::timeout(timeout, pipeline.query_async::<()>(&mut connection)).await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::debug!(count = batch.len(), "could not release slots in Redis; their leases will lapse");
        }
        batch.clear();
    }
}

/// Wakes the first waiter of an upstream whenever any replica announces a
/// freed slot on its channel; reconnects after a second when the link drops.
async fn follow_announcements(cluster: Weak<Cluster>) {
    loop {
        let Some(strong) = cluster.upgrade() else { return };
        let pattern = format!("{}{{*}}:freed", strong.config.key_prefix);
        let client = strong.client.clone();
        let timeout = strong.command_timeout;
        drop(strong);
        let connected = tokio::time::timeout(timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(&pattern).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let Ok(Ok(pubsub)) = connected else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let Some(strong) = cluster.upgrade() else { return };
            let queue = strong.queues.lock().expect("never poisoned").get(message.get_channel_name()).cloned();
            if let Some(queue) = queue.and_then(|q| q.upgrade()) {
                queue.slot_freed();
            }
        }
        // The link dropped: Redis may have restarted and lost every slot, so
        // this replica's are registered again now, before other replicas'
        // picks go on (see `Cluster::recovery_window`).
        let Some(strong) = cluster.upgrade() else { return };
        strong.renew_now.notify_one();
    }
}
