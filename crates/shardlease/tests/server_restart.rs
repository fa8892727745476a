//! A PostgreSQL restart: members lose their sessions, report the loss, reconnect with
//! backoff and rejoin as new incarnations. Runs a private server (initdb on a free port in a
//! temporary directory, as the `postgres` OS user when run as root: the test kit's
//! `PrivateServer`), so that restarting it disturbs no other test.

use std::time::{Duration, Instant};

use shardlease::{Member, MemberConfig};
use shardlease_testkit::PrivateServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_rejoin_after_a_server_restart() {
    let server = PrivateServer::start_default().expect("start a private PostgreSQL");
    let pg = shardlease::parse_database_url(&server.url()).unwrap();
    let mut client = shardlease::connect_client(&pg, "restart-test")
        .await
        .unwrap();
    shardlease::migrate(&mut client).await.unwrap();
    drop(client);
    let cfg = |m: &str| {
        MemberConfig::new("g", m)
            .heartbeat(Duration::from_millis(200))
            .lease_ttl(Duration::from_millis(1500))
            .crash_check(Duration::from_millis(50))
            .reconnect_max_backoff(Duration::from_millis(500))
    };
    let a = Member::join(&pg, cfg("a")).await.unwrap();
    let b = Member::join(&pg, cfg("b")).await.unwrap();
    let both = |v: &shardlease::View| v.is_joined() && v.members.len() == 2;
    a.wait_for(Duration::from_secs(10), both)
        .await
        .expect("a sees both");
    let before = b.view();

    server.restart().expect("restart the private PostgreSQL");
    let restarted = Instant::now();
    // New incarnations for both prove that each lost its session and rejoined.
    for m in [&a, &b] {
        let v = m
            .wait_for(Duration::from_secs(20), |v| {
                both(v)
                    && v.members.iter().all(|x| {
                        before
                            .members
                            .iter()
                            .all(|y| x.incarnation != y.incarnation)
                    })
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{} rejoined with a new incarnation; view {:?}",
                    m.member_id(),
                    m.view()
                )
            });
        assert_eq!(v.slot_count, 2);
    }
    println!(
        "both members rejoined {:?} after the restart",
        restarted.elapsed()
    );
    a.leave().await.unwrap();
    b.leave().await.unwrap();
}
