//! `status`: the group's generation and members, with hash shard and item counts per member
//! (from the balanced shard table of the group's view, as the workers compute it).

use std::collections::BTreeMap;

use anyhow::Result;
use shardlease::shard_table::HASH_SHARDS;
use shardlease::tokio_postgres::Client;
use shardlease::Assignment;

use crate::items::Items;

/// Render the status of `group` as text.
pub async fn render(client: &Client, group: &str, items: &Items) -> Result<String> {
    let Some(g) = client
        .query_opt(
            "SELECT generation, slot_count FROM shardlease.group_status WHERE group_name = $1",
            &[&group],
        )
        .await?
    else {
        return Ok(format!(
            "group {group}: no such group yet (no member has joined it)\n"
        ));
    };
    let generation: i64 = g.get(0);
    let slot_count = g.get::<_, i32>(1) as u32;
    let members = client
        .query(
            "SELECT member_id, slot, alive, extract(epoch FROM expires_in)::float8 \
             FROM shardlease.members WHERE group_name = $1 ORDER BY slot",
            &[&group],
        )
        .await?;
    let assignment = Assignment::new(
        slot_count,
        members.iter().map(|m| m.get::<_, i32>(1) as u32),
    )?;
    let table = assignment.shard_table(HASH_SHARDS)?;
    let mut shards: BTreeMap<u32, usize> = BTreeMap::new();
    let mut item_counts: BTreeMap<u32, i64> = BTreeMap::new();
    for shard in 0..HASH_SHARDS {
        if let Some(slot) = table.owner(shard) {
            *shards.entry(slot).or_default() += 1;
        }
    }
    let mut total = 0;
    let mut unowned = 0;
    for (shard, n) in items.counts_per_hash_shard(client, HASH_SHARDS).await? {
        total += n;
        match table.owner(shard) {
            Some(slot) => *item_counts.entry(slot).or_default() += n,
            None => unowned += n,
        }
    }
    let alive = members.iter().filter(|m| m.get::<_, bool>(2)).count();
    let mut out = format!(
        "group {group}: generation {generation}, slot count {slot_count}, {} members ({alive} alive), {total} items in {HASH_SHARDS} hash shards{}\n",
        members.len(),
        balance(&item_counts, members.len(), total),
    );
    let width = members
        .iter()
        .map(|m| m.get::<_, &str>(0).chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    out.push_str(&format!(
        "{:<width$}  {:>4}  {:>5}  {:>10}  {:>6}  {:>9}\n",
        "MEMBER", "SLOT", "ALIVE", "EXPIRES IN", "SHARDS", "ITEMS"
    ));
    for m in &members {
        let slot = m.get::<_, i32>(1) as u32;
        let expires: f64 = m.get(3);
        out.push_str(&format!(
            "{:<width$}  {:>4}  {:>5}  {:>9.1}s  {:>6}  {:>9}\n",
            m.get::<_, &str>(0),
            slot,
            if m.get::<_, bool>(2) { "yes" } else { "no" },
            expires,
            shards.get(&slot).copied().unwrap_or(0),
            item_counts.get(&slot).copied().unwrap_or(0),
        ));
    }
    if unowned > 0 {
        out.push_str(&format!(
            "{unowned} items have no owner: the group has no members\n"
        ));
    }
    Ok(out)
}

/// ", items per member max/mean 1.023" (nothing when there is no member or no item).
fn balance(items: &BTreeMap<u32, i64>, members: usize, total: i64) -> String {
    match items.values().max() {
        Some(&max) if total > 0 && members > 0 => {
            let mean = total as f64 / members as f64;
            format!(", items per member max/mean {:.3}", max as f64 / mean)
        }
        _ => String::new(),
    }
}
