//! Rebuild when a migration is added, changed or removed: `refinery::embed_migrations!`
//! reads `migrations/shardlease` at compile time, but cargo does not know about that
//! directory on its own, so a new file would otherwise be missing from the build until
//! some Rust source changed too.

fn main() {
    println!("cargo:rerun-if-changed=../../migrations/shardlease");
}
