//! The protocol's names and numbers, shared with anything else that speaks it (psql scripts,
//! other languages).

/// The NOTIFY channel of membership changes. Each payload is a JSON object:
/// `{"group", "generation", "kind", "prev", "slot_count", "delta"}`, where `delta` is
/// `{"join": {"member", "slot", "incarnation"}}` or `{"gone": [incarnation, ...]}` for a
/// change made by shardlease's functions, and `null` (or absent) otherwise. A member whose
/// view is at generation `prev` may apply `delta` to reach `generation`; any other member
/// re-reads the tables.
pub const CHANNEL: &str = "shardlease";

/// The assignment protocol this build speaks (jump hash + splitmix re-probing over S slots).
pub const PROTOCOL_VERSION: i32 = 1;

/// The second key of the group's fence lock, `pg_advisory_xact_lock(lock_key, -1)`: held
/// shared by fenced transactions while they commit, and exclusively by membership changes
/// while they bump the generation.
pub const FENCE_LOCK_SLOT: i32 = -1;

/// Added to a slot for the second key of the transaction lock that marks a fenced
/// transaction as that slot's member's: `pg_advisory_xact_lock_shared(lock_key, 2^30 + slot)`.
pub const FENCED_TX_LOCK_OFFSET: i32 = 1 << 30;
