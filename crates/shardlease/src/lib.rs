//! shardlease (work in progress)
