//! The broker dies (SIGKILL) while clients post pulses to `pulses serve`, and comes
//! back 10 s later on its data. Clients get 503s meanwhile, never a 202 for a pulse
//! that is then missing; after they retry (same pulse_ids), the totals are exact.
//!
//! It kills a broker, so it runs its own: `scripts/broker` on a port of its own
//! (`PULSES_TEST_SERVE_FAULT_BROKER_PORT`, default 19192, controller on the next
//! port). It is the only test of this binary, so it points the harness at that broker
//! through the environment before any client exists.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::agg::*;
use common::serve::*;
use common::own_broker::OwnBroker;
use common::*;

#[test]
fn clients_get_503_while_the_broker_is_down_and_exact_totals_after_retrying() {
    let broker = OwnBroker::start_for_this_binary("PULSES_TEST_SERVE_FAULT_BROKER_PORT", "19192");

    let t = Topics::create("serve-fault", PARTITIONS);
    let cfg = format!("{}\n[serve]\nack_timeout = \"3s\"\n", config("1h", "1h"));
    let base = (now_ms() / 60_000 - 40) * 60_000;
    let tenants = 10;
    let all = vcpu_pulses("f", tenants, 4_000, base, 50); // 40,000 pulses over 200 s of event time
    let batches: Vec<&[P]> = all.chunks(200).collect();
    let (_, admin) = create_key(&t, None);
    let (_serve, addr) = start_serve(&t, &cfg);
    let mut run = Proc::run(&t, &cfg, &[]);
    // The outage hits a running pipeline: started, joined and restored. (Started and
    // killed within its first second, `pulses run` gave up on the broker after 30 s
    // of startup metadata requests, while the restarted broker waited out the crashed
    // one's 30 s session before serving.)
    run.wait_ready();

    let accepted = AtomicUsize::new(0);
    let (unavailable, outage) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..8)
            .map(|c| {
                let (batches, addr, admin, accepted) = (&batches, &addr, &admin, &accepted);
                s.spawn(move || {
                    let client = client();
                    let mut unavailable = 0;
                    for b in batches.iter().skip(c).step_by(8) {
                        // Each batch until it is acknowledged, with the same pulse_ids.
                        loop {
                            match post(&client, addr, admin, batch(b), &[]) {
                                (202, answer) => {
                                    assert_eq!(answer["accepted"], b.len());
                                    break;
                                }
                                (503, answer) => {
                                    assert_eq!(answer["error"], "unavailable", "{answer}");
                                    unavailable += 1;
                                }
                                (status, answer) => panic!("unexpected answer {status}: {answer}"),
                            }
                            std::thread::sleep(Duration::from_millis(500)); // a client's back-off
                        }
                        accepted.fetch_add(1, Ordering::AcqRel);
                        std::thread::sleep(Duration::from_millis(20)); // clients keep posting for a while
                    }
                    unavailable
                })
            })
            .collect();
        // Mid-load: the broker dies for 10 s (the wall time passing is the scenario).
        wait_for("a quarter of the batches accepted", DEADLINE, || (accepted.load(Ordering::Acquire) >= batches.len() / 4).then_some(()));
        broker.script(&["kill"]);
        let killed = Instant::now();
        let at_kill = accepted.load(Ordering::Acquire);
        std::thread::sleep(Duration::from_secs(10));
        broker.script(&["start", "--keep-data"]);
        let outage = (killed.elapsed(), at_kill);
        let unavailable: usize = clients.into_iter().map(|h| h.join().expect("client")).sum();
        (unavailable, outage)
    });
    eprintln!("broker down {:?} after {} of {} batches; {unavailable} answers were 503", outage.0, outage.1, batches.len());
    assert!(unavailable > 0, "clients were told 503 while the broker was down");

    let pushed = vcpu_pulses("push", tenants, 1, base + 900_000, 1);
    produce_pulses(&t.source, &pushed);
    wait_pipeline_done(&t);
    let counted: Vec<P> = all.iter().chain(&pushed).cloned().collect();
    assert_exact(&t, &counted, base + 900_000 - 5_000);
    assert_eq!(run.terminate(Duration::from_secs(30)).code(), Some(0));
}
