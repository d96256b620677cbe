//! Pure scheduling and retention: given the time now, a group's schedule and keep rules, and the
//! snapshots there are, which snapshot to take and which to remove, each with a reason a log or
//! `grainfs prune --dry-run` can show. Times are nanoseconds since the Unix epoch, as the store's
//! `created_ns`; calendar questions (cron fields, hourly to yearly buckets) are asked in a time
//! zone the caller passes (the system's local zone, or a named one).
//!
//! Owns: when a slot is due (`next_after`, `last_at_or_before`, `due`), restic's `forget` rules
//! (`forget`), and the store budget (`over_budget`). Never: reads a clock, touches the store or
//! the disk, takes or deletes a snapshot. The daemon calls in with `now` and acts on the answer.

use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

use crate::config::{KeepConfig, Schedule};

const SECOND_NS: u64 = 1_000_000_000;

/// Slots counted one by one for a cron schedule's catch-up reason stop here.
const SLOT_COUNT_CAP: u64 = 1000;

fn zoned(t_ns: u64, tz: &TimeZone) -> Zoned {
    // Every u64 of nanoseconds (up to the year 2554) is inside jiff's range.
    Timestamp::from_nanosecond(i128::from(t_ns))
        .unwrap_or(Timestamp::MAX)
        .to_zoned(tz.clone())
}

fn ns_of(z: &Zoned) -> u64 {
    u64::try_from(z.timestamp().as_nanosecond()).unwrap_or(0)
}

/// An `every` interval in ns; never 0, so a zero interval (refused by the config) cannot divide
/// by zero here.
fn every_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// The first slot strictly after `t_ns`; `None` if the schedule has none (a cron date that never
/// comes, such as `0 0 30 2 *`, or one past the year 2554).
///
/// `every D` is anchored at the Unix epoch: its slots are the multiples of D since
/// 1970-01-01T00:00:00Z, so `every 15m` runs at :00, :15, :30 and :45 whatever the daemon's
/// start time, and a restart never shifts them. An `every` interval is a length of time, not a
/// calendar unit, and ignores the time zone (`every 1d` runs at 00:00 UTC); a cron expression is
/// read in `tz`, as cron reads it in local time (`@daily` is local midnight).
pub fn next_after(schedule: &Schedule, t_ns: u64, tz: &TimeZone) -> Option<u64> {
    match schedule {
        Schedule::Every(d) => {
            let d = every_ns(*d);
            (t_ns / d).checked_add(1)?.checked_mul(d)
        }
        Schedule::Cron(expr) => {
            // Whole seconds: cron's finest unit is the minute, and croner's search is by second.
            let from = zoned(t_ns - t_ns % SECOND_NS, tz);
            let next = expr.cron().find_next_occurrence(&from, false).ok()?;
            Some(ns_of(&next))
        }
    }
}

/// The latest slot at or before `t_ns`; `None` if there is none (see [`next_after`]).
pub fn last_at_or_before(schedule: &Schedule, t_ns: u64, tz: &TimeZone) -> Option<u64> {
    match schedule {
        Schedule::Every(d) => {
            let d = every_ns(*d);
            Some(t_ns - t_ns % d)
        }
        Schedule::Cron(expr) => {
            let at = zoned(t_ns - t_ns % SECOND_NS, tz);
            let last = expr.cron().find_previous_occurrence(&at, true).ok()?;
            Some(ns_of(&last))
        }
    }
}

/// Slots in `(after_ns, up_to_ns]`, counted up to [`SLOT_COUNT_CAP`] for a cron schedule.
fn slots_between(schedule: &Schedule, after_ns: u64, up_to_ns: u64, tz: &TimeZone) -> u64 {
    if up_to_ns <= after_ns {
        return 0;
    }
    match schedule {
        Schedule::Every(d) => {
            let d = every_ns(*d);
            up_to_ns / d - after_ns / d
        }
        Schedule::Cron(_) => {
            let (mut n, mut t) = (0, after_ns);
            while n < SLOT_COUNT_CAP {
                match next_after(schedule, t, tz) {
                    Some(next) if next <= up_to_ns => (n, t) = (n + 1, next),
                    _ => break,
                }
            }
            n
        }
    }
}

/// What the scheduler should do for one group now, and why (the reason is for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Take one snapshot now. `slot_ns` is the latest slot at or before now; `slots` how many
    /// slots passed since the last run (1 on time; more after downtime, all covered by this one
    /// run; counted up to 1000 for a cron schedule).
    Run {
        slot_ns: u64,
        slots: u64,
        reason: String,
    },
    /// A slot is due but a snapshot of the group is still being taken: none now. Once it ends,
    /// `due` answers `Run` once for every slot that passed meanwhile.
    Busy { slot_ns: u64, reason: String },
    /// Nothing is due; the next slot is at `next_ns` (`None`: the schedule has no next slot).
    Wait {
        next_ns: Option<u64>,
        reason: String,
    },
}

impl Decision {
    /// Why, in words for a log line.
    pub fn reason(&self) -> &str {
        match self {
            Decision::Run { reason, .. }
            | Decision::Busy { reason, .. }
            | Decision::Wait { reason, .. } => reason,
        }
    }
}

/// Whether a group's snapshot is due at `now_ns`.
///
/// `last_run_ns` is when the group's last snapshot was taken (scheduled or not); `None` when it
/// has none, and then one is due at once rather than at a slot that may be a month away.
/// `running` says a snapshot of the group is being taken now. A slot is due when it lies in
/// `(last_run, now]`: a run is never early, never repeated for one slot, and after downtime
/// (or a run that outlasted several slots) exactly one run stands for all the slots missed.
pub fn due(
    schedule: &Schedule,
    last_run_ns: Option<u64>,
    running: bool,
    now_ns: u64,
    tz: &TimeZone,
) -> Decision {
    let at = |t: u64| fmt_time(t, tz);
    let wait = |from: u64| {
        let next_ns = next_after(schedule, from, tz);
        let reason = match next_ns {
            Some(next) => format!("next slot at {}", at(next)),
            None => format!("the schedule has no slot after {}", at(from)),
        };
        Decision::Wait { next_ns, reason }
    };
    let Some(slot_ns) = last_at_or_before(schedule, now_ns, tz) else {
        return wait(now_ns);
    };
    if let Some(last) = last_run_ns {
        if slot_ns <= last {
            // A clock stepped back leaves `last` ahead of now: wait for a slot after both.
            return wait(last.max(now_ns));
        }
    }
    if running {
        return Decision::Busy {
            slot_ns,
            reason: format!(
                "slot {} is due but a snapshot of this group is still being taken; one run \
                 follows when it ends",
                at(slot_ns)
            ),
        };
    }
    let Some(last) = last_run_ns else {
        return Decision::Run {
            slot_ns,
            slots: 1,
            reason: format!("no snapshot of this group yet (slot {})", at(slot_ns)),
        };
    };
    let slots = slots_between(schedule, last, slot_ns, tz).max(1);
    let late = now_ns - slot_ns;
    let reason = if slots > 1 {
        let count = if slots >= SLOT_COUNT_CAP {
            format!("{SLOT_COUNT_CAP} or more")
        } else {
            slots.to_string()
        };
        format!(
            "catching up once for {count} slots missed since the last snapshot at {} (the \
             latest at {}, {} ago)",
            at(last),
            at(slot_ns),
            fmt_span(late)
        )
    } else if late >= 60 * SECOND_NS {
        format!("slot {}, {} late", at(slot_ns), fmt_span(late))
    } else {
        format!("slot {}", at(slot_ns))
    };
    Decision::Run {
        slot_ns,
        slots,
        reason,
    }
}

/// A time as logs show it, in `tz`: `2024-03-31 03:00:00 CEST`.
pub fn fmt_time(t_ns: u64, tz: &TimeZone) -> String {
    zoned(t_ns, tz).strftime("%Y-%m-%d %H:%M:%S %Z").to_string()
}

/// A length of time in the config's duration syntax, largest unit first: `2d`, `1h30m`, `250ms`.
pub fn fmt_span(ns: u64) -> String {
    let ms = ns / 1_000_000;
    let mut out = String::new();
    let mut rest = ms;
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    if rest > 0 || out.is_empty() {
        out.push_str(&format!("{rest}ms"));
    }
    out
}

/// Retention rules for one group, with restic's `forget --keep-*` meaning: each count keeps the
/// newest snapshot of each of the last N hours (days, ISO weeks, months, years) that have
/// snapshots; `last` the N newest; `within` every snapshot newer than the newest one minus the
/// duration. A count of 0 keeps nothing by that rule; no rule at all keeps everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeepRules {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
    /// An absolute length of time (restic counts its days and months on the calendar).
    pub within: Option<Duration>,
}

impl KeepRules {
    /// No rule set: `forget` then keeps every snapshot.
    pub fn is_empty(&self) -> bool {
        *self == KeepRules::default()
    }
}

impl From<&KeepConfig> for KeepRules {
    fn from(k: &KeepConfig) -> KeepRules {
        KeepRules {
            last: k.last,
            hourly: k.hourly,
            daily: k.daily,
            weekly: k.weekly,
            monthly: k.monthly,
            yearly: k.yearly,
            within: k.within,
        }
    }
}

/// One snapshot of a group as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub name: String,
    pub time_ns: u64,
    /// Held snapshots (in use, pinned) are always kept, and still fill their buckets.
    pub held: bool,
}

/// What `forget` decided for one snapshot, with every rule that keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub name: String,
    pub time_ns: u64,
    pub keep: bool,
    /// Empty for a snapshot that goes; else restic's words: `last snapshot`, `daily snapshot`,
    /// `oldest monthly snapshot`, `within 2d`; and ours: `held`, `no keep rule set`.
    pub reasons: Vec<String>,
}

/// A calendar bucket in `tz`, as restic numbers them (YYYYMMDDHH ... YYYY; ISO week YYYYWW).
fn bucket(kind: usize, z: &Zoned, nr: usize) -> i64 {
    let (y, m, d, h) = (
        i64::from(z.year()),
        i64::from(z.month()),
        i64::from(z.day()),
        i64::from(z.hour()),
    );
    match kind {
        0 => nr as i64,
        1 => y * 1_000_000 + m * 10_000 + d * 100 + h,
        2 => y * 10_000 + m * 100 + d,
        3 => {
            let w = z.date().iso_week_date();
            i64::from(w.year()) * 100 + i64::from(w.week())
        }
        4 => y * 100 + m,
        _ => y,
    }
}

/// Which snapshots of one group the rules keep and which go, newest first, as restic's
/// `forget` decides: walking from the newest, a count rule keeps a snapshot that opens a bucket
/// it has not seen while its count lasts, and, if the count is not used up by the oldest
/// snapshot, that one too (`oldest ... snapshot`), so the history kept is as long as it can be.
/// Buckets are read in `tz`: two snapshots in the hour a DST change repeats share an hourly
/// bucket, as they do for restic. `within` counts back from the newest snapshot before `now_ns`
/// (not from now), so a group whose snapshots stopped is not emptied by time passing. Ties in
/// time keep the order given.
pub fn forget(
    snapshots: &[SnapInfo],
    rules: &KeepRules,
    now_ns: u64,
    tz: &TimeZone,
) -> Vec<Verdict> {
    let mut order: Vec<&SnapInfo> = snapshots.iter().collect();
    order.sort_by_key(|s| std::cmp::Reverse(s.time_ns));
    let mut counts = [
        rules.last,
        rules.hourly,
        rules.daily,
        rules.weekly,
        rules.monthly,
        rules.yearly,
    ];
    const WORDS: [&str; 6] = ["last", "hourly", "daily", "weekly", "monthly", "yearly"];
    let mut seen: [Option<i64>; 6] = [None; 6];
    let newest_ns = order.iter().map(|s| s.time_ns).find(|&t| t < now_ns);
    let within_from = rules.within.map(|d| {
        // Everything is within when no snapshot is older than now (restic's zero time).
        newest_ns.map_or(i128::MIN, |t| i128::from(t) - d.as_nanos() as i128)
    });
    let n = order.len();
    let mut verdicts = Vec::with_capacity(n);
    for (nr, s) in order.into_iter().enumerate() {
        let mut reasons = Vec::new();
        if s.held {
            reasons.push("held".to_string());
        }
        if rules.is_empty() {
            reasons.push("no keep rule set".to_string());
        }
        if let (Some(from), Some(d)) = (within_from, rules.within) {
            if i128::from(s.time_ns) > from {
                reasons.push(format!("within {}", fmt_span(every_ns(d))));
            }
        }
        let z = zoned(s.time_ns, tz);
        for kind in 0..6 {
            if counts[kind] == 0 {
                continue;
            }
            let b = bucket(kind, &z, nr);
            let oldest = nr == n - 1;
            if seen[kind] != Some(b) {
                reasons.push(format!("{} snapshot", WORDS[kind]));
            } else if oldest {
                reasons.push(format!("oldest {} snapshot", WORDS[kind]));
            } else {
                continue;
            }
            seen[kind] = Some(b);
            counts[kind] -= 1;
        }
        verdicts.push(Verdict {
            name: s.name.clone(),
            time_ns: s.time_ns,
            keep: !reasons.is_empty(),
            reasons,
        });
    }
    verdicts
}

/// One snapshot in the store, for the store's byte budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnap {
    pub name: String,
    pub group: String,
    pub time_ns: u64,
    /// What removing it frees (its own stored bytes).
    pub bytes: u64,
    pub held: bool,
}

/// What the budget removes, oldest first, and the bytes left after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetCut {
    pub remove: Vec<String>,
    /// Above `max_store_bytes` when held and newest snapshots alone are over it.
    pub bytes_after: u64,
}

/// The snapshots to remove so the store fits `max_store_bytes`: the oldest unheld ones first,
/// never the newest of a group (ties in time: the greatest name counts as newest). Meant to run
/// on what `forget` kept.
pub fn over_budget(snapshots: &[StoredSnap], max_store_bytes: u64) -> BudgetCut {
    let mut bytes_after: u64 = snapshots.iter().map(|s| s.bytes).sum();
    let mut newest: std::collections::BTreeMap<&str, &StoredSnap> = Default::default();
    for s in snapshots {
        let e = newest.entry(&s.group).or_insert(s);
        if (s.time_ns, &s.name) > (e.time_ns, &e.name) {
            *e = s;
        }
    }
    let mut candidates: Vec<&StoredSnap> = snapshots
        .iter()
        .filter(|s| !s.held && !std::ptr::eq(newest[s.group.as_str()], *s))
        .collect();
    candidates.sort_by(|a, b| (a.time_ns, &a.name).cmp(&(b.time_ns, &b.name)));
    let mut remove = Vec::new();
    for s in candidates {
        if bytes_after <= max_store_bytes {
            break;
        }
        bytes_after -= s.bytes;
        remove.push(s.name.clone());
    }
    BudgetCut {
        remove,
        bytes_after,
    }
}

#[cfg(test)]
mod tests;
