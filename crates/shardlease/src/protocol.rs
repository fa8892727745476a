//! The protocol's names and numbers, shared with anything else that speaks it (psql scripts,
//! other languages).

/// The NOTIFY channel of membership changes. Each payload is a JSON object:
/// `{"group", "generation", "kind", "prev", "slot_count", "delta"}`, where `delta` is
/// `{"join": {"member", "slot", "incarnation"}}` or `{"gone": [incarnation, ...]}` for a
/// change made by shardlease's functions, and `null` (or absent) otherwise. A member whose
/// view is at generation `prev` may apply `delta` to reach `generation`; any other member
/// re-reads the tables.
pub const CHANNEL: &str = "shardlease";

/// The assignment protocol this build speaks. Members of one group must map items to slots
/// the same way, so a member refuses to join a group whose members speak another version
/// (`Error::ProtocolMismatch`); an empty group takes the version of its first joiner.
///
/// - **1**: keys by [`Assignment::owner`](crate::Assignment::owner) (jump hash + SplitMix
///   re-probing over S slots); virtual shards by
///   [`Assignment::shards_of`](crate::Assignment::shards_of), one jump hash per shard. The
///   worker ticked 1,024 such shards.
/// - **2** (this build): adds the balanced [`ShardTable`](crate::shard_table::ShardTable)
///   (exact quotas per slot, hash ranges of a stored 32-bit hash); the worker ticks the hash
///   ranges of 65,536 shards. Version 1's functions are unchanged.
///
/// Moving a group from 1 to 2 means no member of an older build may remain: stop them all
/// (scale to zero, or a `Recreate` rollout), then start the new build.
pub const PROTOCOL_VERSION: i32 = 2;

/// The second key of the group's fence lock, `pg_advisory_xact_lock(lock_key, -1)`: held
/// shared by fenced transactions while they commit, and exclusively by membership changes
/// while they bump the generation.
pub const FENCE_LOCK_SLOT: i32 = -1;

/// Added to a slot for the second key of the transaction lock that marks a fenced
/// transaction as that slot's member's: `pg_advisory_xact_lock_shared(lock_key, 2^30 + slot)`.
pub const FENCED_TX_LOCK_OFFSET: i32 = 1 << 30;
