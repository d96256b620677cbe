//! Schedules over a fake clock, and retention over simulated histories (years of hourly
//! snapshots in milliseconds), against expectations written out by hand, in UTC and in
//! Europe/Berlin across its DST changes.

use super::*;

const MIN: u64 = 60 * SECOND_NS;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

/// An instant written with its offset: "2024-03-31T01:30:00Z", "2024-10-27T02:30:00+02:00".
fn t(s: &str) -> u64 {
    let ts: Timestamp = s.parse().unwrap();
    u64::try_from(ts.as_nanosecond()).unwrap()
}

/// A wall-clock time in `tz` ("2024-05-14T23:00"), which must not be ambiguous.
fn local(s: &str, tz: &TimeZone) -> u64 {
    let dt: jiff::civil::DateTime = s.parse().unwrap();
    ns_of(&dt.to_zoned(tz.clone()).unwrap())
}

fn berlin() -> TimeZone {
    TimeZone::get("Europe/Berlin").unwrap()
}

fn sched(s: &str) -> Schedule {
    s.parse().unwrap()
}

// ---- schedules ----

#[test]
fn every_lands_on_multiples_of_the_interval_since_the_epoch() {
    let every = sched("every 15m");
    let utc = TimeZone::UTC;
    let next = |at: &str| next_after(&every, t(at), &utc);
    assert_eq!(
        next("2024-05-15T10:07:30Z"),
        Some(t("2024-05-15T10:15:00Z"))
    );
    // Strictly after: a slot is never its own next.
    assert_eq!(
        next("2024-05-15T10:15:00Z"),
        Some(t("2024-05-15T10:30:00Z"))
    );
    let last = last_at_or_before(&every, t("2024-05-15T10:15:00Z"), &utc);
    assert_eq!(last, Some(t("2024-05-15T10:15:00Z")));
    // `every 1d` is a length of time: midnight UTC, whatever the zone.
    let daily = sched("every 1d");
    let next = next_after(&daily, t("2024-05-15T10:00:00Z"), &berlin());
    assert_eq!(next, Some(t("2024-05-16T00:00:00Z")));
}

#[test]
fn cron_names_steps_and_nicknames() {
    let b = berlin();
    let next = |s: &str, at: &str, tz: &TimeZone| next_after(&sched(s), t(at), tz);
    let utc = TimeZone::UTC;
    assert_eq!(
        next("*/15 * * * *", "2024-05-15T10:07:00Z", &utc),
        Some(t("2024-05-15T10:15:00Z"))
    );
    // Friday 2024-03-29 after 09:00 in Berlin: the next weekday 09:00 is Monday, in CEST.
    assert_eq!(
        next("0 9 * * mon-fri", "2024-03-29T10:00:00+01:00", &b),
        Some(t("2024-04-01T09:00:00+02:00"))
    );
    assert_eq!(
        next("0 3 1 jan,jul *", "2024-01-01T03:00:00Z", &utc),
        Some(t("2024-07-01T03:00:00Z"))
    );
    assert_eq!(
        next("0 8-18/5 * * *", "2024-05-15T09:00:00Z", &utc),
        Some(t("2024-05-15T13:00:00Z"))
    );
    // @daily is local midnight; the day DST starts has 23 hours.
    let mar31 = next("@daily", "2024-03-30T12:00:00Z", &b);
    assert_eq!(mar31, Some(t("2024-03-31T00:00:00+01:00")));
    let apr1 = next("@daily", "2024-03-31T00:00:00+01:00", &b);
    assert_eq!(apr1, Some(t("2024-04-01T00:00:00+02:00")));
    assert_eq!(apr1.unwrap() - mar31.unwrap(), 23 * HOUR);
    assert_eq!(
        next("@hourly", "2024-05-15T10:00:00Z", &utc),
        Some(t("2024-05-15T11:00:00Z"))
    );
    // A date that never comes.
    assert_eq!(next("0 0 30 2 *", "2024-01-01T00:00:00Z", &utc), None);
}

#[test]
fn due_on_time_and_not_before() {
    let every = sched("every 15m");
    let utc = TimeZone::UTC;
    let last = Some(t("2024-05-15T10:00:00Z"));
    let d = due(&every, last, false, t("2024-05-15T10:14:59Z"), &utc);
    assert_eq!(
        d,
        Decision::Wait {
            next_ns: Some(t("2024-05-15T10:15:00Z")),
            reason: "next slot at 2024-05-15 10:15:00 UTC".into()
        }
    );
    let d = due(&every, last, false, t("2024-05-15T10:15:00Z"), &utc);
    assert_eq!(
        d,
        Decision::Run {
            slot_ns: t("2024-05-15T10:15:00Z"),
            slots: 1,
            reason: "slot 2024-05-15 10:15:00 UTC".into()
        }
    );
    // Taken at 10:15:02: that slot is done.
    let d = due(
        &every,
        Some(t("2024-05-15T10:15:02Z")),
        false,
        t("2024-05-15T10:16:00Z"),
        &utc,
    );
    assert!(matches!(d, Decision::Wait { next_ns: Some(n), .. } if n == t("2024-05-15T10:30:00Z")));
    // Never snapshotted: one now.
    let d = due(&every, None, false, t("2024-05-15T10:16:00Z"), &utc);
    assert!(matches!(d, Decision::Run { slots: 1, .. }), "{d:?}");
    assert!(
        d.reason().starts_with("no snapshot of this group yet"),
        "{d:?}"
    );
}

#[test]
fn downtime_is_caught_up_once() {
    let every = sched("every 15m");
    let utc = TimeZone::UTC;
    let last = Some(t("2024-05-15T10:15:00Z"));
    let d = due(&every, last, false, t("2024-05-15T12:50:00Z"), &utc);
    // Slots 10:30 .. 12:45 passed while the daemon was down: ten of them, one run.
    assert_eq!(
        d,
        Decision::Run {
            slot_ns: t("2024-05-15T12:45:00Z"),
            slots: 10,
            reason: "catching up once for 10 slots missed since the last snapshot at \
                     2024-05-15 10:15:00 UTC (the latest at 2024-05-15 12:45:00 UTC, 5m ago)"
                .into()
        }
    );
    // One slot missed by hours is late, not a catch-up.
    let daily = sched("0 3 * * *");
    let d = due(
        &daily,
        Some(t("2024-05-14T03:00:00Z")),
        false,
        t("2024-05-15T14:30:00Z"),
        &utc,
    );
    assert_eq!(d.reason(), "slot 2024-05-15 03:00:00 UTC, 11h30m late");
    // A cron schedule counts its missed slots too.
    let d = due(
        &daily,
        Some(t("2024-05-10T03:00:00Z")),
        false,
        t("2024-05-15T14:30:00Z"),
        &utc,
    );
    assert!(matches!(d, Decision::Run { slots: 5, .. }), "{d:?}");
}

#[test]
fn a_running_snapshot_is_never_doubled() {
    let every = sched("every 15m");
    let utc = TimeZone::UTC;
    let d = due(
        &every,
        Some(t("2024-05-15T10:00:00Z")),
        true,
        t("2024-05-15T10:15:00Z"),
        &utc,
    );
    assert_eq!(
        d,
        Decision::Busy {
            slot_ns: t("2024-05-15T10:15:00Z"),
            reason: "slot 2024-05-15 10:15:00 UTC is due but a snapshot of this group is still \
                     being taken; one run follows when it ends"
                .into()
        }
    );
    // Running but nothing due: just wait.
    let d = due(
        &every,
        Some(t("2024-05-15T10:15:00Z")),
        true,
        t("2024-05-15T10:20:00Z"),
        &utc,
    );
    assert!(matches!(d, Decision::Wait { .. }), "{d:?}");
}

/// A scheduler over a fake clock: ticks every `step` in `[start, end]`, is dead during `down`
/// (half-open ranges), and each snapshot takes `takes`. Returns when snapshots started.
fn simulate(
    schedule: &Schedule,
    mut last: Option<u64>,
    (start, end, step): (u64, u64, u64),
    down: &[(u64, u64)],
    takes: u64,
) -> Vec<u64> {
    let mut runs = Vec::new();
    let mut busy_until = 0;
    let mut now = start;
    while now <= end {
        if !down.iter().any(|&(a, b)| (a..b).contains(&now)) {
            let running = busy_until > now;
            if let Decision::Run { .. } = due(schedule, last, running, now, &TimeZone::UTC) {
                assert!(!running, "two snapshots at once at {now}");
                runs.push(now);
                last = Some(now);
                busy_until = now + takes;
            }
        }
        now += step;
    }
    runs
}

#[test]
fn fake_clock_on_time_downtime_and_overlap() {
    let every = sched("every 15m");
    let at = |hm: &str| t(&format!("2024-05-15T{hm}:00Z"));
    let window = |a: &str, b: &str| (at(a), at(b), MIN);
    let start = Some(at("10:00"));
    let runs = simulate(&every, start, window("10:00", "11:00"), &[], MIN);
    assert_eq!(runs, [at("10:15"), at("10:30"), at("10:45"), at("11:00")]);
    // Down from 10:20 to 12:50: one run when it comes back, then on time again.
    let down = [(at("10:20"), at("12:50"))];
    let runs = simulate(&every, start, window("10:00", "13:15"), &down, MIN);
    assert_eq!(runs, [at("10:15"), at("12:50"), at("13:00"), at("13:15")]);
    // Each snapshot takes 40 minutes: the slots it covers become one run right after it.
    let runs = simulate(&every, start, window("10:00", "12:00"), &[], 40 * MIN);
    assert_eq!(runs, [at("10:15"), at("10:55"), at("11:35")]);
}

// ---- retention ----

fn snap(name: &str, time_ns: u64) -> SnapInfo {
    SnapInfo {
        name: name.into(),
        time_ns,
        held: false,
    }
}

/// (name, reasons) of what is kept, newest first; and the names that go.
fn outcome(v: &[Verdict]) -> (Vec<(String, Vec<String>)>, Vec<String>) {
    let kept = v
        .iter()
        .filter(|v| v.keep)
        .map(|v| (v.name.clone(), v.reasons.clone()))
        .collect();
    let gone = v
        .iter()
        .filter(|v| !v.keep)
        .map(|v| v.name.clone())
        .collect();
    (kept, gone)
}

fn kept(list: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    list.iter()
        .map(|(n, r)| (n.to_string(), r.iter().map(|r| r.to_string()).collect()))
        .collect()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|n| n.to_string()).collect()
}

const FAR: u64 = u64::MAX;

#[test]
fn buckets_count_only_periods_that_have_snapshots() {
    let utc = TimeZone::UTC;
    let history = [
        snap("s1", t("2024-01-01T10:00:00Z")),
        snap("s2", t("2024-01-01T18:00:00Z")),
        snap("s3", t("2024-01-03T09:00:00Z")),
        snap("s4", t("2024-01-03T21:00:00Z")),
        snap("s5", t("2024-01-06T08:00:00Z")),
        snap("s6", t("2024-01-06T12:00:00Z")),
        snap("s7", t("2024-01-06T12:30:00Z")),
    ];
    let rules = KeepRules {
        last: 2,
        daily: 3,
        ..Default::default()
    };
    // Jan 2, 4 and 5 have no snapshot and use none of the three days.
    let (k, gone) = outcome(&forget(&history, &rules, FAR, &utc));
    assert_eq!(
        k,
        kept(&[
            ("s7", &["last snapshot", "daily snapshot"]),
            ("s6", &["last snapshot"]),
            ("s4", &["daily snapshot"]),
            ("s2", &["daily snapshot"]),
        ])
    );
    assert_eq!(gone, names(&["s5", "s3", "s1"]));
    // A count left over keeps the oldest snapshot too, even in a bucket already kept.
    let rules = KeepRules {
        daily: 4,
        ..Default::default()
    };
    let (k, _) = outcome(&forget(&history, &rules, FAR, &utc));
    assert_eq!(
        k,
        kept(&[
            ("s7", &["daily snapshot"]),
            ("s4", &["daily snapshot"]),
            ("s2", &["daily snapshot"]),
            ("s1", &["oldest daily snapshot"]),
        ])
    );
}

#[test]
fn within_counts_back_from_the_newest_snapshot_before_now() {
    let utc = TimeZone::UTC;
    let newest = t("2024-05-15T12:00:00Z");
    let history = [
        snap("edge", newest - 2 * DAY),
        snap("inside", newest - 2 * DAY + 1),
        snap("newest", newest),
        snap("future", t("2024-06-01T00:00:00Z")),
    ];
    let rules = KeepRules {
        within: Some(Duration::from_secs(2 * 86_400)),
        ..Default::default()
    };
    // A month after the newest snapshot, the window has not moved: it hangs on the newest
    // snapshot before now, not on now, nor on one in the future.
    let now = t("2024-05-20T00:00:00Z");
    let (k, gone) = outcome(&forget(&history, &rules, now, &utc));
    assert_eq!(
        k,
        kept(&[
            ("future", &["within 2d"]),
            ("newest", &["within 2d"]),
            ("inside", &["within 2d"]),
        ])
    );
    assert_eq!(gone, names(&["edge"]));
}

#[test]
fn held_snapshots_stay_and_no_rule_keeps_all() {
    let utc = TimeZone::UTC;
    let mut history = [
        snap("a", t("2024-05-15T10:00:00Z")),
        snap("b", t("2024-05-15T11:00:00Z")),
        snap("c", t("2024-05-15T12:00:00Z")),
    ];
    history[0].held = true;
    history[2].held = true;
    let rules = KeepRules {
        last: 1,
        ..Default::default()
    };
    let (k, gone) = outcome(&forget(&history, &rules, FAR, &utc));
    assert_eq!(
        k,
        kept(&[("c", &["held", "last snapshot"]), ("a", &["held"])])
    );
    assert_eq!(gone, names(&["b"]));
    let (k, gone) = outcome(&forget(&history, &KeepRules::default(), FAR, &utc));
    assert_eq!(k.len(), 3);
    assert_eq!(k[1], ("b".to_string(), names(&["no keep rule set"])));
    assert!(gone.is_empty());
}

#[test]
fn bucket_edges_year_and_iso_week() {
    let utc = TimeZone::UTC;
    // The last nanosecond of 2023 is 2023's; midnight is 2024's.
    let history = [
        snap("y2023", t("2023-12-31T23:59:59.999999999Z")),
        snap("midnight", t("2024-01-01T00:00:00Z")),
        snap("after", t("2024-01-01T00:00:00.000000001Z")),
    ];
    let rules = KeepRules {
        yearly: 2,
        ..Default::default()
    };
    let (k, gone) = outcome(&forget(&history, &rules, FAR, &utc));
    assert_eq!(
        k,
        kept(&[
            ("after", &["yearly snapshot"]),
            ("y2023", &["yearly snapshot"])
        ])
    );
    assert_eq!(gone, names(&["midnight"]));
    // ISO weeks: Sunday 2021-01-03 and Thursday 2020-12-31 are both in 2020-W53.
    let history = [
        snap("w51", t("2020-12-20T12:00:00Z")),
        snap("thu", t("2020-12-31T12:00:00Z")),
        snap("sun", t("2021-01-03T12:00:00Z")),
        snap("mon", t("2021-01-04T12:00:00Z")),
    ];
    let rules = KeepRules {
        weekly: 3,
        ..Default::default()
    };
    let (k, gone) = outcome(&forget(&history, &rules, FAR, &utc));
    assert_eq!(
        k,
        kept(&[
            ("mon", &["weekly snapshot"]),
            ("sun", &["weekly snapshot"]),
            ("w51", &["weekly snapshot"]),
        ])
    );
    assert_eq!(gone, names(&["thu"]));
}

/// A snapshot every hour on the hour (UTC) from `from` to `to`, named by their time in `tz`.
fn hourly_history(from: u64, to: u64, tz: &TimeZone) -> Vec<SnapInfo> {
    (0..=(to - from) / HOUR)
        .map(|i| {
            let time_ns = from + i * HOUR;
            let name = zoned(time_ns, tz).strftime("%Y-%m-%dT%H:%M").to_string();
            snap(&name, time_ns)
        })
        .collect()
}

const ALL: &[&str] = &[
    "last snapshot",
    "hourly snapshot",
    "daily snapshot",
    "weekly snapshot",
    "monthly snapshot",
    "yearly snapshot",
];

/// What the rules of `years_of_hourly_snapshots` keep, written by hand, in the zone's own
/// wall-clock time: the newest is Wednesday 2024-05-15 at `h` o'clock (ISO week 20).
fn expected_over_years(h: u32) -> Vec<(String, Vec<String>)> {
    let hour = |back: u32| format!("2024-05-15T{:02}:00", h - back);
    let (h0, h1, h2, h3, h4) = (hour(0), hour(1), hour(2), hour(3), hour(4));
    kept(&[
        (&h0, ALL),
        (&h1, &["last snapshot", "hourly snapshot"]),
        (&h2, &["last snapshot", "hourly snapshot"]),
        (&h3, &["hourly snapshot"]),
        (&h4, &["hourly snapshot"]),
        ("2024-05-14T23:00", &["daily snapshot"]),
        ("2024-05-13T23:00", &["daily snapshot"]),
        // Sunday: the newest of ISO week 19, and of its day.
        ("2024-05-12T23:00", &["daily snapshot", "weekly snapshot"]),
        ("2024-05-05T23:00", &["weekly snapshot"]),
        ("2024-04-30T23:00", &["monthly snapshot"]),
        ("2024-03-31T23:00", &["monthly snapshot"]),
        ("2023-12-31T23:00", &["yearly snapshot"]),
        ("2022-12-31T23:00", &["yearly snapshot"]),
    ])
}

#[test]
fn years_of_hourly_snapshots_utc_and_berlin() {
    let rules = KeepRules {
        last: 3,
        hourly: 5,
        daily: 4,
        weekly: 3,
        monthly: 3,
        yearly: 3,
        within: None,
    };
    for (tz, newest_hour) in [(TimeZone::UTC, 13), (berlin(), 15)] {
        // 2021-01-01 to 2024-05-15 13:00 UTC (15:00 in Berlin, CEST): about 29,000 snapshots.
        let history = hourly_history(t("2021-01-01T00:00:00Z"), t("2024-05-15T13:00:00Z"), &tz);
        let verdicts = forget(&history, &rules, FAR, &tz);
        let (k, gone) = outcome(&verdicts);
        assert_eq!(k, expected_over_years(newest_hour), "{tz:?}");
        assert_eq!(gone.len(), history.len() - 13);
    }
    // Two more years: 2021's newest, and its oldest for the count left over.
    let rules = KeepRules {
        yearly: 5,
        ..Default::default()
    };
    let utc = TimeZone::UTC;
    let history = hourly_history(t("2021-01-01T00:00:00Z"), t("2024-05-15T13:00:00Z"), &utc);
    let (k, _) = outcome(&forget(&history, &rules, FAR, &utc));
    assert_eq!(
        k,
        kept(&[
            ("2024-05-15T13:00", &["yearly snapshot"]),
            ("2023-12-31T23:00", &["yearly snapshot"]),
            ("2022-12-31T23:00", &["yearly snapshot"]),
            ("2021-12-31T23:00", &["yearly snapshot"]),
            ("2021-01-01T00:00", &["oldest yearly snapshot"]),
        ])
    );
}

#[test]
fn dst_repeated_hour_shares_one_hourly_bucket() {
    let b = berlin();
    // 2024-10-27 in Berlin: 03:00 CEST becomes 02:00 CET, so 02:30 comes twice.
    let history = [
        snap("01:30 CEST", t("2024-10-27T01:30:00+02:00")),
        snap("02:30 CEST", t("2024-10-27T02:30:00+02:00")),
        snap("02:30 CET", t("2024-10-27T02:30:00+01:00")),
        snap("03:30 CET", t("2024-10-27T03:30:00+01:00")),
    ];
    let rules = KeepRules {
        hourly: 10,
        ..Default::default()
    };
    let (k, gone) = outcome(&forget(&history, &rules, FAR, &b));
    assert_eq!(
        k,
        kept(&[
            ("03:30 CET", &["hourly snapshot"]),
            ("02:30 CET", &["hourly snapshot"]),
            ("01:30 CEST", &["hourly snapshot"]),
        ])
    );
    assert_eq!(gone, names(&["02:30 CEST"]));
    // In UTC they are four different hours.
    let (k, _) = outcome(&forget(&history, &rules, FAR, &TimeZone::UTC));
    assert_eq!(k.len(), 4);
}

#[test]
fn dst_day_of_23_hours_and_local_midnight() {
    let b = berlin();
    // Hourly from 2024-03-30 01:00 CET to 2024-04-01 14:00 CEST; March 31 has 23 hours.
    let history = hourly_history(t("2024-03-30T00:00:00Z"), t("2024-04-01T12:00:00Z"), &b);
    let rules = KeepRules {
        daily: 10,
        ..Default::default()
    };
    let (k, gone) = outcome(&forget(&history, &rules, FAR, &b));
    assert_eq!(
        k,
        kept(&[
            ("2024-04-01T14:00", &["daily snapshot"]),
            // 21:00 UTC; 22:00 UTC is already local midnight of April 1.
            ("2024-03-31T23:00", &["daily snapshot"]),
            ("2024-03-30T23:00", &["daily snapshot"]),
            ("2024-03-30T01:00", &["oldest daily snapshot"]),
        ])
    );
    assert_eq!(
        local("2024-04-01T00:00", &b) - local("2024-03-31T00:00", &b),
        23 * HOUR
    );
    // March 31 in Berlin: from 23:00 UTC the day before to 21:00 UTC, 23 snapshots.
    let mar31 = history
        .iter()
        .filter(|s| s.name.starts_with("2024-03-31"))
        .count();
    assert_eq!(mar31, 23);
    assert_eq!(gone.len(), history.len() - 4);
}

// ---- store budget ----

fn stored(name: &str, group: &str, hour: u64, bytes: u64, held: bool) -> StoredSnap {
    StoredSnap {
        name: name.into(),
        group: group.into(),
        time_ns: t("2024-05-15T00:00:00Z") + hour * HOUR,
        bytes,
        held,
    }
}

#[test]
fn budget_removes_oldest_unheld_and_never_a_groups_newest() {
    let store = [
        stored("a1", "a", 1, 100, false),
        stored("b1", "b", 2, 100, true),
        stored("a2", "a", 3, 100, false),
        stored("b2", "b", 4, 100, false),
        stored("a3", "a", 5, 100, false),
        stored("b3", "b", 6, 100, false),
    ];
    // 600 bytes; 350 allowed: a1, then a2 (b1 is held), then b2.
    let cut = over_budget(&store, 350);
    assert_eq!(cut.remove, names(&["a1", "a2", "b2"]));
    assert_eq!(cut.bytes_after, 300);
    // Under budget: nothing goes.
    assert_eq!(over_budget(&store, 600).remove, Vec::<String>::new());
    // Nothing fits: all but the held one and each group's newest go, and the rest is over.
    let cut = over_budget(&store, 0);
    assert_eq!(cut.remove, names(&["a1", "a2", "b2"]));
    assert_eq!(cut.bytes_after, 300);
    // A group of one keeps its only snapshot.
    let cut = over_budget(&[stored("only", "c", 1, 1 << 40, false)], 1);
    assert!(cut.remove.is_empty() && cut.bytes_after == 1 << 40);
}

#[test]
fn spans_read_like_config_durations() {
    assert_eq!(fmt_span(2 * DAY), "2d");
    assert_eq!(fmt_span(HOUR + 30 * MIN), "1h30m");
    assert_eq!(fmt_span(250_000_000), "250ms");
    assert_eq!(fmt_span(0), "0ms");
    assert_eq!(
        crate::config::parse_duration(&fmt_span(HOUR + 30 * MIN)),
        Ok(Duration::from_secs(5400))
    );
}
