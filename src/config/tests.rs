//! The config's rules against files a user would write: the documented example loads, every
//! key's good and bad values (errors naming key and line), per-group policy over `[policy]`,
//! and which reloads are taken and which refused.

use super::*;
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../conf/grainfs.toml");

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new("/etc/grainfs/conf.toml"))
}

/// The error's Display, asserting it names `key` at `line`.
fn error_at(text: &str, key: &str, line: usize) -> String {
    let err = parse(text).expect_err("config should be rejected");
    let shown = err.to_string();
    let ConfigError::Invalid {
        line: got,
        key: got_key,
        ..
    } = &err
    else {
        panic!("not an Invalid error: {shown}");
    };
    assert_eq!((got_key.as_str(), *got), (key, line), "{shown}");
    let prefix = format!("/etc/grainfs/conf.toml:{line}:");
    assert!(shown.starts_with(&prefix) && shown.contains(key), "{shown}");
    shown
}

#[test]
fn example_config_loads_with_documented_values() {
    let c = parse(EXAMPLE).expect("conf/grainfs.toml must load");
    assert_eq!(c.backing.as_deref(), Some(Path::new("/srv/volumes")));
    assert_eq!(c.mountpoint.as_deref(), Some(Path::new("/mnt/volumes")));
    let store = c.store_dir(Path::new("/srv/volumes"));
    assert_eq!(store, Path::new("/srv/volumes/.grainfs"));
    let defaults = Config::default();
    assert_eq!(c.cache, defaults.cache);
    assert_eq!(c.fuse, defaults.fuse);
    assert_eq!(c.tracking, defaults.tracking);
    assert_eq!(c.policy, defaults.policy);
    assert_eq!(c.tracking.block_size, 65536);
    assert_eq!(c.tracking.partition_size, 64 << 20);
    assert_eq!(c.tracking.interval, Duration::from_secs(10));
    assert_eq!((c.timezone.as_deref(), c.max_store_bytes), (None, None));
    let vms = GroupConfig {
        name: "vms".into(),
        volumes: vec!["vms/*.img".into()],
        schedule: Some(Schedule::Every(Duration::from_secs(15 * 60))),
        keep: KeepConfig {
            last: 4,
            hourly: 24,
            daily: 7,
            weekly: 4,
            monthly: 6,
            yearly: 0,
            within: None,
        },
        policy: defaults.policy.clone(),
    };
    assert_eq!(c.groups, vec![vms]);
    let without_examples = Config {
        backing: None,
        mountpoint: None,
        groups: Vec::new(),
        ..c
    };
    assert_eq!(without_examples, defaults);
}

#[test]
fn schedules_and_retention_are_accepted() {
    let group = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\n";
    let every = parse(&format!("{group}schedule = \"every 15m\"\n")).expect("every");
    let every_15m = Schedule::Every(Duration::from_secs(900));
    assert_eq!(every.groups[0].schedule, Some(every_15m));
    for cron in [
        "@hourly",
        "@daily",
        "0 */6 * * *",
        "30 2 * * mon-fri",
        "0 3 1 jan,jul *",
    ] {
        let c = parse(&format!("{group}schedule = \"{cron}\"\n")).expect(cron);
        let parsed = &c.groups[0].schedule;
        assert!(
            matches!(parsed, Some(Schedule::Cron(e)) if e.as_str() == cron),
            "{cron}: {parsed:?}"
        );
    }
    // An interval under a second is a mistake, not a wish for a snapshot per millisecond.
    let fast = format!("{group}schedule = \"every 500ms\"\n");
    let shown = error_at(&fast, "group[0].schedule", 4);
    assert!(shown.ends_with("interval must be at least 1s"), "{shown}");
    let zero = format!("{group}schedule = \"every 0s\"\n");
    error_at(&zero, "group[0].schedule", 4);
    let keep = "keep = { last = 4, hourly = 24, daily = 7, weekly = 4, monthly = 6, yearly = 3, \
                within = \"2d\" }\n";
    let c = parse(&format!("{group}{keep}")).expect("keep");
    let expected = KeepConfig {
        last: 4,
        hourly: 24,
        daily: 7,
        weekly: 4,
        monthly: 6,
        yearly: 3,
        within: Some(Duration::from_secs(2 * 86_400)),
    };
    assert_eq!(c.groups[0].keep, expected);
    let table = format!("{group}[group.keep]\nyearly = 10\nwithin = \"1w\"\n");
    let table = parse(&table).expect("keep table");
    let week = Some(Duration::from_secs(7 * 86_400));
    assert_eq!(
        (table.groups[0].keep.yearly, table.groups[0].keep.within),
        (10, week)
    );
    let none = parse(group).expect("no keep");
    assert_eq!(
        none.groups[0].keep,
        KeepConfig::default(),
        "keep everything"
    );
}

#[test]
fn keep_values_are_checked() {
    let group = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\n";
    for (keep, key) in [
        ("keep = { yearly = -1 }", "group[0].keep.yearly"),
        ("keep = { yearly = \"3\" }", "group[0].keep.yearly"),
        ("keep = { within = 2 }", "group[0].keep.within"),
        ("keep = { within = \"2 days\" }", "group[0].keep.within"),
    ] {
        error_at(&format!("{group}{keep}\n"), key, 4);
    }
    let zero = format!("{group}keep = {{ within = \"0s\" }}\n");
    let shown = error_at(&zero, "group[0].keep.within", 4);
    assert!(shown.contains("must be more than 0s"), "{shown}");
    let years = format!("{group}keep = {{ within = \"2y\" }}\n");
    let shown = error_at(&years, "group[0].keep.within", 4);
    assert!(shown.contains("unknown unit \"y\""), "{shown}");
}

#[test]
fn timezone_is_an_iana_name() {
    assert_eq!(Config::default().timezone, None);
    assert!(Config::default().time_zone().is_ok());
    for zone in ["Europe/Berlin", "UTC", "America/New_York", "Asia/Kolkata"] {
        let c = parse(&format!("timezone = \"{zone}\"\n")).expect(zone);
        assert_eq!(c.timezone.as_deref(), Some(zone));
        let tz = c.time_zone().expect("the zone loads");
        assert_eq!(tz.iana_name(), Some(zone));
    }
    let shown = error_at("threads = 2\ntimezone = \"Mars/Olympus\"\n", "timezone", 2);
    assert!(
        shown.contains("unknown time zone \"Mars/Olympus\""),
        "{shown}"
    );
    error_at("timezone = \"\"\n", "timezone", 1);
    error_at("timezone = 1\n", "timezone", 1);
}

#[test]
fn max_store_bytes_is_a_size_above_zero() {
    assert_eq!(Config::default().max_store_bytes, None);
    let c = parse("max_store_bytes = \"500GiB\"\n").expect("500GiB");
    assert_eq!(c.max_store_bytes, Some(500 << 30));
    let shown = error_at("\nmax_store_bytes = \"0\"\n", "max_store_bytes", 2);
    assert!(shown.contains("must be more than 0"), "{shown}");
    error_at("max_store_bytes = \"500GB\"\n", "max_store_bytes", 1);
    error_at("max_store_bytes = 500\n", "max_store_bytes", 1);
}

#[test]
fn a_groups_policy_overrides_the_global_one_key_by_key() {
    let text = "[policy]\nfull_rate = 50.0\nmax_chain = 6\n\
                [[group]]\nname = \"db\"\nvolumes = [\"db/*\"]\n\
                policy = { full_rate = 20.0, full_dirty_fraction = 0.3 }\n\
                [[group]]\nname = \"vms\"\nvolumes = [\"vms/*\"]\n\
                [group.policy]\nmax_chain = 4\n\
                [[group]]\nname = \"plain\"\nvolumes = [\"x\"]\n";
    let c = parse(text).expect("policies");
    let global = PolicyConfig {
        full_rate: 50.0,
        full_dirty_fraction: 0.5,
        max_chain: 6,
    };
    assert_eq!(c.policy, global);
    let db = PolicyConfig {
        full_rate: 20.0,
        full_dirty_fraction: 0.3,
        ..global.clone()
    };
    let vms = PolicyConfig {
        max_chain: 4,
        ..global.clone()
    };
    let policies: Vec<_> = c.groups.iter().map(|g| g.policy.clone()).collect();
    assert_eq!(policies, vec![db, vms, global]);
    // Without [policy], the keys a group leaves out are the defaults.
    let only = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\npolicy = { max_chain = 2 }\n";
    let only = parse(only).expect("a group's policy alone");
    let two = PolicyConfig {
        max_chain: 2,
        ..Config::default().policy
    };
    assert_eq!(only.groups[0].policy, two);
}

#[test]
fn a_groups_policy_is_checked_like_the_global_one() {
    let groups = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\n\
                  [[group]]\nname = \"b\"\nvolumes = [\"b\"]\n";
    for (policy, key) in [
        ("policy = { full_rate = -1 }", "group[1].policy.full_rate"),
        (
            "policy = { full_dirty_fraction = 1.5 }",
            "group[1].policy.full_dirty_fraction",
        ),
        ("policy = { max_chain = 0 }", "group[1].policy.max_chain"),
        (
            "policy = { max_chain = \"4\" }",
            "group[1].policy.max_chain",
        ),
    ] {
        error_at(&format!("{groups}{policy}\n"), key, 7);
    }
    let typo = format!("{groups}policy = {{ max_chains = 4 }}\n");
    let shown = error_at(&typo, "group[1].policy.max_chains", 7);
    assert!(shown.contains("did you mean \"max_chain\""), "{shown}");
    let table = format!("{groups}[group.policy]\nfull_rate = 1.0\n\nfull_rat = 2.0\n");
    error_at(&table, "group[1].policy.full_rat", 10);
    error_at(&format!("{groups}policy = 3\n"), "group[1].policy", 7);
}

#[test]
fn snapshot_setuid_is_off_unless_set() {
    assert!(!Config::default().snapshot_setuid);
    let c = parse("snapshot_setuid = true\n").expect("parse");
    assert!(c.snapshot_setuid);
}

#[test]
fn empty_text_gives_the_embedded_defaults() {
    assert_eq!(parse("").ok(), Some(Config::default()));
}

#[test]
fn a_number_the_parser_cannot_hold_names_its_key_and_line() {
    let e = parse("[tracking]\nenabled = true\nblock_size = 99999999999999999999\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(":3:") && e.contains("tracking.block_size:"),
        "{e}"
    );
    let e = parse("[[group]]\nname = \"a\"\nvolumes = [\"*\"]\n[[group]]\nname = \"b\"\nvolumes = [\"*\"]\n[policy]\nfull_rate = 1e400\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains(":8:") && e.contains("policy.full_rate:"), "{e}");
    let e = parse("[[group]]\nname = \"a\"\n[[group]]\nname = \"b\"\nkeep = { last = 99999999999999999999 }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains(":5:") && e.contains("group[1].keep:"), "{e}");
}

#[test]
fn load_reads_the_file_and_names_a_missing_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("grainfs.toml");
    std::fs::write(&path, "backing = \"volumes\"\nstore = \"/var/lib/g\"\n").expect("write");
    let c = Config::load(&path).expect("load");
    // A relative path is taken relative to the config file's directory.
    assert_eq!(c.backing, Some(dir.path().join("volumes")));
    assert_eq!(c.store_dir(Path::new("/x")), Path::new("/var/lib/g"));
    let missing = dir.path().join("nope.toml");
    let err = Config::load(&missing).expect_err("missing file");
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(
        err.to_string().contains(&*missing.to_string_lossy()),
        "{err}"
    );
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let shown = error_at("threads = 2\nthread = 4\n", "thread", 2);
    assert!(shown.contains("did you mean \"threads\""), "{shown}");
    let shown = error_at(
        "# c\n\n[tracking]\nenabled = true\n\n\nblok_size = \"64KiB\"\n",
        "tracking.blok_size",
        7,
    );
    assert_eq!(
        shown,
        "/etc/grainfs/conf.toml:7:1: tracking.blok_size: unknown key (did you mean \
         \"block_size\"?); expected one of: enabled, block_size, partition_size, interval"
    );
    error_at("[trackin]\nenabled = true\n", "trackin", 1);
    error_at("tracking.size = 1\n", "tracking.size", 1);
    let groups = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\n\
                  [[group]]\nname = \"b\"\nvolumes = [\"b\"]\nretain = 3\n";
    error_at(groups, "group[1].retain", 7);
    let keep = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\nkeep = { last = 1, quarterly = 2 }\n";
    error_at(keep, "group[0].keep.quarterly", 4);
    let keep_table = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\n[group.keep]\nhours = 1\n";
    error_at(keep_table, "group[0].keep.hours", 5);
}

#[test]
fn wrong_types_are_named_with_their_line() {
    let shown = error_at("\n[tracking]\nblock_size = 12\n", "tracking.block_size", 3);
    assert!(shown.contains("found integer 12"), "{shown}");
    error_at("threads = \"4\"\n", "threads", 1);
    error_at("[policy]\nfull_rate = \"fast\"\n", "policy.full_rate", 2);
    error_at("[group]\nname = \"a\"\n", "group", 1);
    let keep = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\nkeep = { daily = \"7\" }\n";
    error_at(keep, "group[0].keep.daily", 4);
    error_at(
        "[[group]]\nname = \"a\"\nvolumes = [\"a\", 3]\n",
        "group[0].volumes[1]",
        3,
    );
    error_at("threads = -1\n", "threads", 1);
    let shown = error_at("\nthreads = 1979-05-27\n", "threads", 2);
    assert!(
        shown.ends_with("expected an integer, found a datetime"),
        "{shown}"
    );
    error_at("tracking.enabled = \"yes\"\n", "tracking.enabled", 1);
}

#[test]
fn shapes_serde_would_take_are_refused_in_plain_words() {
    // A derived struct also reads an array of its fields in order.
    let shown = error_at("policy = [1]\n", "policy", 1);
    assert!(
        shown.ends_with("expected a table, found an array"),
        "{shown}"
    );
    // A table made by a dotted key has no span of its own.
    let shown = error_at("\nthreads.x = 1\n", "threads", 2);
    assert!(
        shown.ends_with("expected an integer, found a table"),
        "{shown}"
    );
    let shown = error_at("[group]\nname = \"a\"\n", "group", 1);
    assert!(shown.contains("([[group]]), found a table"), "{shown}");
    // A wrong type inside an array points at the element, not the array.
    let multiline = "[[group]]\nname = \"a\"\nvolumes = [\"a\",\n  3]\n";
    let shown = error_at(multiline, "group[0].volumes[1]", 4);
    assert!(shown.ends_with("found integer 3"), "{shown}");
}

#[test]
fn bad_values_are_named_with_their_line() {
    let shown = error_at(
        "[tracking]\nblock_size = \"3KiB\"\n",
        "tracking.block_size",
        2,
    );
    assert!(shown.contains("power of two"), "{shown}");
    error_at(
        "[tracking]\nblock_size = \"64KB\"\n",
        "tracking.block_size",
        2,
    );
    error_at("[tracking]\ninterval = \"0s\"\n", "tracking.interval", 2);
    error_at("[tracking]\ninterval = \"5min\"\n", "tracking.interval", 2);
    let part = "[tracking]\nblock_size = \"1MiB\"\npartition_size = \"1536KiB\"\n";
    error_at(part, "tracking.partition_size", 3);
    error_at("[cache]\nattr_timeout = \"2h\"\n", "cache.attr_timeout", 2);
    error_at(
        "[fuse]\nwriteback_cache = \"yes\"\n",
        "fuse.writeback_cache",
        2,
    );
    error_at("[fuse]\nwrite_back = true\n", "fuse.write_back", 2);
    error_at(
        "[policy]\nfull_dirty_fraction = 0.0\n",
        "policy.full_dirty_fraction",
        2,
    );
    error_at("[policy]\nfull_rate = -1\n", "policy.full_rate", 2);
    error_at("[policy]\nmax_chain = 0\n", "policy.max_chain", 2);
    error_at("threads = 1000\n", "threads", 1);
    error_at("snapdir = \"shown\"\n", "snapdir", 1);
    error_at(
        "threads = 2\nsnapshot_setuid = \"yes\"\n",
        "snapshot_setuid",
        2,
    );
    error_at("log_level = \"verbose\"\n", "log_level", 1);
    error_at("backing = \"\"\n", "backing", 1);
    let dup = "[[group]]\nname = \"vms\"\nvolumes = [\"a\"]\n\
               [[group]]\nname = \"vms\"\nvolumes = [\"b\"]\n";
    let shown = error_at(dup, "group[1].name", 5);
    assert!(shown.contains("duplicate"), "{shown}");
    error_at(
        "[[group]]\nname = \"all\"\nvolumes = [\"a\"]\n",
        "group[0].name",
        2,
    );
    error_at(
        "[[group]]\nname = \"a b\"\nvolumes = [\"a\"]\n",
        "group[0].name",
        2,
    );
    error_at("\n[[group]]\nvolumes = [\"a\"]\n", "group[0].name", 2);
    error_at(
        "[[group]]\nname = \"a\"\nvolumes = []\n",
        "group[0].volumes",
        3,
    );
    let abs = "[[group]]\nname = \"a\"\nvolumes = [\"ok/*\",\n  \"/abs/*\"]\n";
    error_at(abs, "group[0].volumes[1]", 4);
    error_at(
        "[[group]]\nname = \"a\"\nvolumes = [\"../x\"]\n",
        "group[0].volumes[0]",
        3,
    );
    let cron = "[[group]]\nname = \"a\"\nvolumes = [\"a\"]\nschedule = \"61 * * * *\"\n";
    error_at(cron, "group[0].schedule", 4);
}

#[test]
fn syntax_errors_give_the_line() {
    let err = parse("threads = 2\nbacking = \n").expect_err("syntax");
    let shown = err.to_string();
    assert!(shown.starts_with("/etc/grainfs/conf.toml:2:"), "{shown}");
    assert!(!shown.contains('\n'), "{shown}");
    let dup = parse("threads = 2\nthreads = 3\n").expect_err("duplicate key");
    assert!(
        dup.to_string().starts_with("/etc/grainfs/conf.toml:2:"),
        "{dup}"
    );
}

proptest! {
    #[test]
    fn any_text_gives_a_config_or_a_located_error(text in "[ -~\n]{0,200}") {
        if let Err(ConfigError::Invalid { line, column, .. }) = parse(&text) {
            prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1);
            prop_assert!(column >= 1);
        }
    }
}

const MOUNTED: &str = "backing = \"/srv/volumes\"\nmountpoint = \"/mnt/volumes\"\n\
                       [tracking]\nblock_size = \"64KiB\"\n\
                       [[group]]\nname = \"vms\"\nvolumes = [\"vms/*.img\"]\n";

#[test]
fn a_reload_may_change_groups_retention_policy_and_zone() {
    let old = parse(MOUNTED).expect("old");
    assert!(old.check_reload(&old.clone()).is_ok());
    let new = format!(
        "log_level = \"debug\"\ntimezone = \"Europe/Berlin\"\nmax_store_bytes = \"1TiB\"\n\
         {MOUNTED}schedule = \"@daily\"\nkeep = {{ daily = 7, within = \"36h\" }}\n\
         policy = {{ max_chain = 3 }}\n[[group]]\nname = \"db\"\nvolumes = [\"db/*\"]\n\
         [policy]\nfull_rate = 5.0\n"
    );
    let new = parse(&new).expect("new");
    assert_ne!(old, new);
    old.check_reload(&new).expect("allowed changes");
    new.check_reload(&old).expect("and back");
    // The same values on other lines, and a default written out, are no change.
    let moved = "\n\n[tracking]\nenabled = true\nblock_size = \"64KiB\"\n[cache]\n\
                 [[group]]\nname = \"vms\"\nvolumes = [\"vms/*.img\"]\n";
    let moved = format!("backing = \"/srv/volumes\"\nmountpoint = \"/mnt/volumes\"\n{moved}");
    old.check_reload(&parse(&moved).expect("moved"))
        .expect("moved keys");
}

/// The reload error from `old` to `new`, asserting it names `key` at `line` of the new file.
fn refused(old: &str, new: &str, key: &str, line: usize) -> String {
    let old = parse(old).expect("old");
    let new = Config::from_toml(new, Path::new("/etc/grainfs/new.toml")).expect("new");
    let err = old
        .check_reload(&new)
        .expect_err("the reload should be refused");
    let shown = err.to_string();
    let ConfigError::Invalid {
        line: got,
        key: got_key,
        ..
    } = &err
    else {
        panic!("not an Invalid error: {shown}");
    };
    assert_eq!((got_key.as_str(), *got), (key, line), "{shown}");
    let prefix = format!("/etc/grainfs/new.toml:{line}:");
    assert!(shown.starts_with(&prefix), "{shown}");
    let end = "cannot change on reload; unmount and mount again";
    assert!(shown.ends_with(end), "{shown}");
    shown
}

#[test]
fn a_reload_that_needs_a_remount_is_refused_naming_key_and_line() {
    let backing = MOUNTED.replace("/srv/volumes", "/srv/other");
    let shown = refused(MOUNTED, &backing, "backing", 1);
    assert_eq!(
        shown,
        "/etc/grainfs/new.toml:1:11: backing: the mount uses \"/srv/volumes\", this file says \
         \"/srv/other\": cannot change on reload; unmount and mount again"
    );
    let block = MOUNTED.replace("64KiB", "1MiB");
    let shown = refused(MOUNTED, &block, "tracking.block_size", 4);
    assert!(
        shown.contains("the mount uses 64KiB, this file says 1MiB"),
        "{shown}"
    );
    let partition = MOUNTED.replace("[tracking]\n", "[tracking]\npartition_size = \"128MiB\"\n");
    refused(MOUNTED, &partition, "tracking.partition_size", 4);
    let threads = format!("threads = 3\n{MOUNTED}");
    let cache = format!("{threads}[cache]\n\nattr_timeout = \"5s\"\n");
    refused(&threads, &cache, "cache.attr_timeout", 11);
    let snapdir = format!("snapdir = \"visible\"\n{MOUNTED}");
    refused(MOUNTED, &snapdir, "snapdir", 1);
    let untracked = MOUNTED.replace("[tracking]\n", "[tracking]\nenabled = false\n");
    refused(MOUNTED, &untracked, "tracking.enabled", 4);
    let ring = format!("{MOUNTED}[fuse]\ntransport = \"io_uring\"\n");
    let shown = refused(MOUNTED, &ring, "fuse.transport", 9);
    assert!(
        shown.contains("the mount uses \"auto\", this file says \"io_uring\""),
        "{shown}"
    );
}

#[test]
fn transport_is_auto_io_uring_or_dev() {
    assert_eq!(parse("").unwrap().fuse.transport, Transport::Auto);
    for (text, want) in [
        ("auto", Transport::Auto),
        ("io_uring", Transport::IoUring),
        ("dev", Transport::Dev),
    ] {
        let c = parse(&format!("[fuse]\ntransport = \"{text}\"\n")).unwrap();
        assert_eq!(c.fuse.transport, want);
        assert_eq!(want.as_str(), text);
    }
    let shown = error_at(
        "[fuse]\nwriteback_cache = false\ntransport = \"uring\"\n",
        "fuse.transport",
        3,
    );
    assert!(shown.contains("is not auto, io_uring or dev"), "{shown}");
    error_at("[fuse]\ntransport = true\n", "fuse.transport", 2);
}

#[test]
fn writeback_cache_is_read_as_given() {
    for on in [true, false] {
        let text = format!("[fuse]\nwriteback_cache = {on}\n");
        assert_eq!(parse(&text).unwrap().fuse.writeback_cache, on);
    }
    assert!(!parse("").unwrap().fuse.writeback_cache, "default");
}

#[test]
fn a_key_removed_on_reload_is_named_at_the_line_it_had() {
    let old = "\n[tracking]\nblock_size = \"1MiB\"\n";
    let shown = refused(old, "\n\n\n", "tracking.block_size", 3);
    assert!(
        shown.contains("removed (it was 1MiB at line 3 when mounted; left out it means 64KiB)"),
        "{shown}"
    );
}
