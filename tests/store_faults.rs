//! The store's failure injection (`store::failing::Failing`) under the snapshot engine: random
//! sequences of writes, snapshots and deletions, each snapshot or deletion with a fault (EIO,
//! ENOSPC, a torn write, an error after the call took effect) at a random call to the store.
//! After every step: every listed snapshot verifies and reads back as the volumes were at its
//! instant (a snapshot whose commit failed after it became visible counts as taken), none of
//! them went missing, and the live volumes hold exactly what was written.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use grainfs::config::PolicyConfig;
use grainfs::ids::{Geometry, SnapshotName, VolumeId};
use grainfs::snapshot::{CreateRequest, Engine, EngineOptions};
use grainfs::store::failing::{Failing, Fault};
use grainfs::store::local::LocalDir;
use grainfs::store::Store;
use proptest::prelude::*;

mod common;
use common::{Noise, Overlay};

const BS: u64 = 4096;
const G: Geometry = Geometry {
    block_size: BS,
    partition_size: 16 * BS,
};
const VOLUMES: [&str; 2] = ["a.img", "b.img"];

fn sn(name: &str) -> SnapshotName {
    SnapshotName::parse(name).unwrap()
}

/// A backing dir with its store inside, the overlay, and an engine whose store fails on
/// demand. `store()` opens the same directory without faults, for the checks.
struct Fx {
    overlay: Overlay,
    engine: Engine,
    faults: Arc<Failing>,
}

impl std::ops::Deref for Fx {
    type Target = Overlay;

    fn deref(&self) -> &Overlay {
        &self.overlay
    }
}

impl Fx {
    fn new() -> Fx {
        let overlay = Overlay::tracked(G, Duration::from_secs(3600), |_| {});
        let faults = Arc::new(Failing::new(Arc::new(
            LocalDir::open(&overlay.store).unwrap(),
        )));
        let engine = Engine::with_store(
            EngineOptions {
                backing: overlay.backing.clone(),
                store_dir: overlay.store.clone(),
                tracker: overlay.tracker().clone(),
                policy: PolicyConfig {
                    full_rate: 1e12,
                    full_dirty_fraction: 0.5,
                    max_chain: 3,
                },
                groups: Vec::new(),
                workers: 2,
                flush: Box::new(|| {}),
                defer_writes: true,
            },
            Store::on(faults.clone()),
        )
        .unwrap();
        Fx {
            overlay,
            engine,
            faults,
        }
    }

    fn store(&self) -> Store {
        Store::open(&self.store).unwrap()
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Write {
        vol: usize,
        off: u64,
        len: usize,
        seed: u64,
    },
    /// Take a snapshot; the `nth` store call from its start fails with `fault` (if it makes
    /// that many).
    Snapshot { nth: u64, fault: Fault },
    /// Delete the `pick`th taken snapshot (modulo their number), with a fault as above.
    Delete { pick: usize, nth: u64, fault: Fault },
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        Just(Fault::Io),
        Just(Fault::NoSpace),
        Just(Fault::Torn),
        Just(Fault::After),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..VOLUMES.len(), 0..48 * BS, 1..3 * BS as usize, any::<u64>())
            .prop_map(|(vol, off, len, seed)| Op::Write { vol, off, len, seed }),
        3 => (0..48u64, fault()).prop_map(|(nth, fault)| Op::Snapshot { nth, fault }),
        1 => (any::<usize>(), 0..24u64, fault())
            .prop_map(|(pick, nth, fault)| Op::Delete { pick, nth, fault }),
    ]
}

/// What each volume held at a snapshot's instant.
type State = BTreeMap<VolumeId, Vec<u8>>;

/// Every listed snapshot verifies and reads back as taken; every taken one is listed; every
/// live volume holds what was written.
fn check(fx: &Fx, taken: &BTreeMap<String, State>, live: &[Vec<u8>], after: &str) {
    let store = fx.store();
    let listed = store.names().unwrap();
    let known: Vec<&String> = taken.keys().collect();
    assert_eq!(
        listed.iter().collect::<Vec<_>>(),
        known,
        "after {after}: listed snapshots differ from the ones taken"
    );
    for (name, state) in taken {
        let r = store.verify(&sn(name)).unwrap();
        assert!(r.ok(), "after {after}: {name} fails verify: {r:?}");
        for (id, want) in state {
            let v = store.open_volume(&sn(name), *id).unwrap();
            let mut got = vec![0u8; v.size() as usize];
            assert_eq!(v.read_at(&mut got, 0).unwrap(), got.len());
            assert!(
                got == *want,
                "after {after}: {name} volume {id} differs from its instant"
            );
        }
    }
    for (i, want) in live.iter().enumerate() {
        let got = std::fs::read(fx.backing.join(VOLUMES[i])).unwrap();
        assert!(got == *want, "after {after}: live {} changed", VOLUMES[i]);
    }
}

fn run(ops: &[Op]) -> (u64, u64) {
    let fx = Fx::new();
    let fh: Vec<u64> = VOLUMES.iter().map(|v| fx.create(v)).collect();
    let mut live: Vec<Vec<u8>> = vec![Vec::new(); VOLUMES.len()];
    let mut taken: BTreeMap<String, State> = BTreeMap::new();
    let (mut fired, mut n) = (0u64, 0u64);
    for op in ops {
        let what = format!("{op:?}");
        match *op {
            Op::Write {
                vol,
                off,
                len,
                seed,
            } => {
                let data = Noise::new(seed).bytes(len);
                fx.fs.write(fh[vol], off, &data).unwrap();
                let end = off as usize + len;
                if live[vol].len() < end {
                    live[vol].resize(end, 0);
                }
                live[vol][off as usize..end].copy_from_slice(&data);
            }
            Op::Snapshot { nth, fault } => {
                n += 1;
                let name = format!("s{n:03}");
                let state: State = VOLUMES
                    .iter()
                    .zip(&live)
                    .map(|(v, d)| (fx.id(v), d.clone()))
                    .collect();
                fx.faults.fail_at(nth, fault);
                let r = fx.engine.create(&CreateRequest {
                    name: Some(sn(&name)),
                    ..Default::default()
                });
                fx.faults.disarm();
                let hit = fx.faults.fired();
                fired += u64::from(hit.is_some());
                match r {
                    Ok(_) => {
                        taken.insert(name, state);
                    }
                    Err(e) => {
                        assert!(hit.is_some(), "{what}: failed with no fault: {e}");
                        // An error after the commit's rename leaves the snapshot visible and
                        // complete: then it is taken.
                        if fx.store().exists(&sn(&name)).unwrap() {
                            taken.insert(name, state);
                        }
                    }
                }
            }
            Op::Delete { pick, nth, fault } => {
                if taken.is_empty() {
                    continue;
                }
                let name = taken.keys().nth(pick % taken.len()).unwrap().clone();
                fx.faults.fail_at(nth, fault);
                let r = fx.engine.delete(&sn(&name));
                fx.faults.disarm();
                fired += u64::from(fx.faults.fired().is_some());
                let gone = !fx.store().exists(&sn(&name)).unwrap();
                match r {
                    Ok(_) => assert!(gone, "{what}: {name} deleted but still there"),
                    Err(e) => {
                        let why = e.to_string();
                        assert!(
                            fx.faults.fired().is_some() || why.contains("is the parent of"),
                            "{what}: failed with no fault: {why}"
                        );
                    }
                }
                if gone {
                    taken.remove(&name);
                }
            }
        }
        check(&fx, &taken, &live, &what);
    }
    (fired, n)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// No fault at any store call of a snapshot or a deletion leaves a snapshot that fails
    /// `verify` or reads back wrong, loses a committed one, or changes live data; a failed
    /// snapshot's changes go into the next one.
    #[test]
    fn a_fault_anywhere_in_the_store_never_damages_a_snapshot_or_live_data(
        ops in proptest::collection::vec(op(), 1..24)
    ) {
        run(&ops);
    }
}

/// The proptest's faults do land: over a fixed sequence, every call of a snapshot fails once in
/// turn, each fault kind in turn (a sweep, not a sample).
#[test]
fn every_store_call_of_a_snapshot_fails_in_turn_without_harm() {
    let faults = [Fault::Io, Fault::NoSpace, Fault::Torn, Fault::After];
    let mut fired = 0;
    for nth in 0..40u64 {
        let fault = faults[nth as usize % faults.len()];
        let ops = [
            Op::Write {
                vol: 0,
                off: 0,
                len: 20 * BS as usize,
                seed: 1,
            },
            Op::Write {
                vol: 1,
                off: 3 * BS,
                len: 5000,
                seed: 2,
            },
            Op::Snapshot {
                nth: u64::MAX,
                fault,
            },
            Op::Write {
                vol: 0,
                off: BS,
                len: 100,
                seed: 3,
            },
            Op::Snapshot { nth, fault },
            Op::Write {
                vol: 1,
                off: 9 * BS,
                len: 7,
                seed: 4,
            },
            Op::Snapshot {
                nth: u64::MAX,
                fault,
            },
            Op::Delete {
                pick: 2,
                nth: nth % 12,
                fault,
            },
        ];
        fired += run(&ops).0;
    }
    assert!(
        fired >= 30,
        "only {fired} faults fired: the sweep misses calls"
    );
}
