use super::*;

const GOOD: &str = r#"
[resource]
name = "work-vm"
size = "16GiB"
protocol = "C"

[node]
id = 1
name = "desk"
backing = "/var/lib/vmsync/work-vm.img"
metadata = "/var/lib/vmsync/work-vm.meta"
listen = "192.168.1.10:7790"
control_socket = "/run/vmsync/work-vm.sock"
lan_group = "home"

[directory]
address = "192.168.1.20:7700"

[security]
secret_file = "/etc/vmsync/cluster.secret"

[[peer]]
id = 2
name = "laptop"
address = "192.168.1.11:7790"
lan_group = "home"

[[peer]]
id = 3
name = "office"
address = "10.0.0.5:7790"
lan_group = "office"
"#;

fn parse_str(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("/etc/vmsync/node.toml"), text)
}

fn error_of(text: &str) -> String {
    parse_str(text).unwrap_err().to_string()
}

#[test]
fn the_documented_example_parses() {
    let c = parse_str(GOOD).unwrap();
    assert_eq!(c.resource.name, "work-vm");
    assert_eq!(c.resource.size, 16 << 30);
    assert_eq!(c.resource.protocol, Protocol::C);
    assert_eq!(c.node.id, 1);
    assert_eq!(c.node.listen, Some("192.168.1.10:7790".parse().unwrap()));
    assert_eq!(c.directory, Some("192.168.1.20:7700".parse().unwrap()));
    assert_eq!(c.peers.len(), 2);
    assert!(c.is_lan_peer(&c.peers[0]));
    assert!(!c.is_lan_peer(&c.peers[1]));
    assert!(!c.node.direct_io);
}

#[test]
fn a_standalone_node_needs_no_listen_secret_or_peers() {
    let c = parse_str(
        r#"
[resource]
name = "vm0"
size = 268435456
[node]
id = 0
name = "solo"
backing = "/tmp/a.img"
metadata = "/tmp/a.meta"
control_socket = "/tmp/a.sock"
direct_io = true
"#,
    )
    .unwrap();
    assert!(c.is_standalone());
    assert_eq!(c.resource.size, 256 << 20);
    assert_eq!(c.resource.protocol, Protocol::A);
    assert!(c.node.direct_io);
}

#[test]
fn sizes_accept_binary_suffixes() {
    assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    assert_eq!(parse_size("16GiB"), Ok(16 << 30));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("2T"), Ok(2 << 40));
    assert!(parse_size("12XB")
        .unwrap_err()
        .contains("unknown size suffix"));
    assert!(parse_size("GiB").is_err());
    assert!(parse_size("99999999999TiB")
        .unwrap_err()
        .contains("too large"));
}

#[test]
fn wan_rates_take_bits_per_second_or_sizes() {
    assert_eq!(parse_rate("7Mbit"), Ok(875_000));
    assert_eq!(parse_rate("1.5 Mbit"), Ok(187_500));
    assert_eq!(parse_rate("800kbit"), Ok(100_000));
    assert_eq!(parse_rate("1MiB"), Ok(1 << 20));
    assert_eq!(parse_rate("4096"), Ok(4096));
    assert!(parse_rate("fastMbit").unwrap_err().contains("not a rate"));
    let config = parse(
        Path::new("t.toml"),
        &format!("{GOOD}\n[replication]\nwan_rate = \"7Mbit\"\n"),
    )
    .unwrap();
    assert_eq!(config.replication.wan_rate, 875_000);
}

#[test]
fn wan_compression_is_zstd_unless_set_and_an_unknown_codec_is_named() {
    use protocol::compress::Codec;
    let with = |value: &str| format!("{GOOD}\n[replication]\nwan_compression = \"{value}\"\n");
    assert_eq!(
        parse(Path::new("t.toml"), GOOD)
            .unwrap()
            .replication
            .wan_compression,
        Codec::Zstd
    );
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
        let c = parse(Path::new("t.toml"), &with(codec.name())).unwrap();
        assert_eq!(c.replication.wan_compression, codec);
    }
    let e = error_of(&with("gzip"));
    assert!(
        e.contains("`replication.wan_compression`")
            && e.contains("'gzip' is not one of: zstd, lz4, none"),
        "{e}"
    );
}

#[test]
fn errors_name_the_file_the_key_and_the_reason() {
    let e = error_of(&GOOD.replace("\"16GiB\"", "\"16XB\""));
    assert!(
        e.starts_with("/etc/vmsync/node.toml: key `resource.size`:"),
        "{e}"
    );
    assert!(e.contains("unknown size suffix"), "{e}");

    let e = error_of(&GOOD.replace("size = \"16GiB\"", "size = \"1000\""));
    assert!(
        e.contains("`resource.size`") && e.contains("multiple of 4 KiB"),
        "{e}"
    );

    let e = error_of(&GOOD.replace("protocol = \"C\"", "protocol = \"B\""));
    assert!(
        e.contains("`resource.protocol`") && e.contains("not A or C"),
        "{e}"
    );

    let e = error_of(&GOOD.replace("id = 2", "id = 1"));
    assert!(
        e.contains("`peer[0].id`") && e.contains("used twice"),
        "{e}"
    );

    let e = error_of(&GOOD.replace("id = 3", "id = 99"));
    assert!(
        e.contains("`peer[1].id`") && e.contains("out of range"),
        "{e}"
    );

    let e = error_of(&GOOD.replace("\"10.0.0.5:7790\"", "\"office.example\""));
    assert!(
        e.contains("`peer[1].address`") && e.contains("IP:PORT"),
        "{e}"
    );

    let e = error_of(&GOOD.replace("name = \"work-vm\"", "name = \"work vm\""));
    assert!(e.contains("`resource.name`"), "{e}");

    let e = error_of(&GOOD.replace("listen = \"192.168.1.10:7790\"\n", ""));
    assert!(
        e.contains("`node.listen`") && e.contains("required when peers"),
        "{e}"
    );
}

#[test]
fn syntax_unknown_keys_and_missing_keys_name_the_file_and_key() {
    let e = error_of("[resource\nname = 1");
    assert!(e.starts_with("/etc/vmsync/node.toml:"), "{e}");

    let e = error_of(&GOOD.replace(
        "lan_group = \"home\"\n\n[directory]",
        "lan_grop = \"home\"\n\n[directory]",
    ));
    assert!(e.contains("lan_grop"), "{e}");

    let e = error_of(&GOOD.replace("backing = \"/var/lib/vmsync/work-vm.img\"\n", ""));
    assert!(e.contains("backing"), "{e}");

    let e = error_of(&GOOD.replace("id = 1\n", "id = \"one\"\n"));
    assert!(e.contains("id"), "{e}");
}

#[test]
fn load_reports_an_unreadable_file_with_its_path() {
    let e = load(Path::new("/nonexistent/vmsync.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("/nonexistent/vmsync.toml: cannot read"),
        "{e}"
    );
}

#[test]
fn ping_settings_default_and_are_validated() {
    let c = parse_str(GOOD).unwrap();
    assert_eq!(c.replication.ping_interval_ms, 1000);
    assert_eq!(c.replication.ping_timeout_ms, 5000);
    assert_eq!(c.node.control_group, None);

    let with = |table: &str| format!("{GOOD}\n[replication]\n{table}\n");
    let c = parse_str(&with("ping_interval_ms = 200\nping_timeout_ms = 1000")).unwrap();
    assert_eq!(c.replication.ping_interval_ms, 200);
    assert_eq!(c.replication.ping_timeout_ms, 1000);

    let e = error_of(&with("ping_timeout_ms = 1500"));
    assert!(
        e.contains("`replication.ping_timeout_ms`") && e.contains("at least twice"),
        "{e}"
    );
    let e = error_of(&with("ping_interval_ms = 0"));
    assert!(e.contains("`replication.ping_interval_ms`"), "{e}");
    let e = error_of(&with("ping_interval_ms = 5\nping_timeout_ms = 100"));
    assert!(
        e.contains("`replication.ping_interval_ms`") && e.contains("minimum of 10"),
        "{e}"
    );
}

#[test]
fn a_control_group_must_exist() {
    let text = GOOD.replace("[node]\n", "[node]\ncontrol_group = \"root\"\n");
    let c = parse_str(&text).unwrap();
    assert_eq!(c.node.control_group.map(|g| g.gid), Some(0));
    let e = error_of(&GOOD.replace("[node]\n", "[node]\ncontrol_group = \"nope-vmsync\"\n"));
    assert!(
        e.contains("`node.control_group`") && e.contains("no group named"),
        "{e}"
    );
    let e = error_of(&GOOD.replace("[node]\n", "[node]\ncontrol_group = \"a b\"\n"));
    assert!(e.contains("`node.control_group`"), "{e}");
}

#[test]
fn weak_secrets_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.secret");
    let config =
        parse_str(&GOOD.replace("/etc/vmsync/cluster.secret", &file.display().to_string()))
            .unwrap();
    for (weak, why) in [
        ("short\n", "at least 16"),
        ("aaaaaaaaaaaaaaaaaaaaaaaa\n", "distinct byte values"),
        ("hunter2!hunter2!hunter2!\n", "pattern repeated"),
        ("abcdefghijklmnopqrstu\n", "constant step"),
        ("0123456789abcdef\n", "too guessable"),
    ] {
        std::fs::write(&file, weak).unwrap();
        let e = config.read_secret().unwrap_err().to_string();
        assert!(e.contains("security.secret_file"), "{e}");
        assert!(e.contains(&file.display().to_string()), "{e}");
        assert!(e.contains(why), "{weak:?}: {e}");
        assert!(e.contains("gen-secret"), "{e}");
    }
    std::fs::write(&file, protocol::generate_secret()).unwrap();
    assert_eq!(config.read_secret().unwrap().len(), 64);
}

#[test]
fn the_split_brain_policy_defaults_to_disconnect_and_is_validated() {
    use super::AfterSplitBrain;
    let c = parse_str(GOOD).unwrap();
    assert_eq!(c.replication.after_split_brain, AfterSplitBrain::Disconnect);
    let with = |value: &str| format!("{GOOD}\n[replication]\nafter_split_brain = \"{value}\"\n");
    for (name, policy) in [
        ("discard-secondary", AfterSplitBrain::DiscardSecondary),
        ("discard-zero-changes", AfterSplitBrain::DiscardZeroChanges),
        (
            "discard-younger-primary",
            AfterSplitBrain::DiscardYoungerPrimary,
        ),
        ("disconnect", AfterSplitBrain::Disconnect),
    ] {
        let c = parse_str(&with(name)).unwrap();
        assert_eq!(c.replication.after_split_brain, policy);
        assert_eq!(policy.name(), name);
    }
    let e = error_of(&with("discard-everything"));
    assert!(
        e.contains("`replication.after_split_brain`")
            && e.contains("'discard-everything' is not one of: disconnect, discard-secondary, discard-zero-changes, discard-younger-primary"),
        "{e}"
    );
}

#[test]
fn zero_copy_send_defaults_to_auto_and_is_validated() {
    use protocol::zerocopy::ZeroCopySend;
    let c = parse_str(GOOD).unwrap();
    assert_eq!(c.replication.zero_copy_send, ZeroCopySend::Auto);
    let with = |value: &str| format!("{GOOD}\n[replication]\nzero_copy_send = \"{value}\"\n");
    for (name, mode) in [
        ("on", ZeroCopySend::On),
        ("off", ZeroCopySend::Off),
        ("auto", ZeroCopySend::Auto),
    ] {
        let c = parse_str(&with(name)).unwrap();
        assert_eq!(c.replication.zero_copy_send, mode);
        assert_eq!(mode.name(), name);
    }
    let e = error_of(&with("always"));
    assert!(
        e.contains("`replication.zero_copy_send`")
            && e.contains("'always' is not one of: auto, on, off"),
        "{e}"
    );
}

#[test]
fn verify_rate_defaults_to_100_mib_and_takes_sizes() {
    assert_eq!(parse_str(GOOD).unwrap().replication.verify_rate, 100 << 20);
    let c = parse_str(&format!("{GOOD}\n[replication]\nverify_rate = \"8MiB\"\n")).unwrap();
    assert_eq!(c.replication.verify_rate, 8 << 20);
    let c = parse_str(&format!("{GOOD}\n[replication]\nverify_rate = 0\n")).unwrap();
    assert_eq!(c.replication.verify_rate, 0);
    assert!(
        error_of(&format!("{GOOD}\n[replication]\nverify_rate = \"fast\"\n"))
            .contains("replication.verify_rate")
    );
}

#[test]
fn ublk_zero_copy_is_on_unless_turned_off() {
    assert!(parse_str(GOOD).unwrap().node.ublk_zero_copy);
    let off = GOOD.replacen("[node]\n", "[node]\nublk_zero_copy = false\n", 1);
    assert!(!parse_str(&off).unwrap().node.ublk_zero_copy);
    let bad = GOOD.replacen("[node]\n", "[node]\nublk_zero_copy = \"yes\"\n", 1);
    assert!(parse_str(&bad).is_err());
}

#[test]
fn ublk_queues_default_to_one_and_are_bounded() {
    assert_eq!(parse_str(GOOD).unwrap().node.ublk_queues, 1);
    let with = |n: &str| GOOD.replacen("[node]\n", &format!("[node]\nublk_queues = {n}\n"), 1);
    assert_eq!(parse_str(&with("4")).unwrap().node.ublk_queues, 4);
    for bad in ["0", "65", "-1"] {
        let e = error_of(&with(bad));
        assert!(
            e.contains("`node.ublk_queues`") && e.contains("not between 1 and 64"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn resync_min_rate_is_off_unless_set_and_never_above_the_cap() {
    assert_eq!(parse_str(GOOD).unwrap().replication.resync_min_rate, 0);
    let with = |keys: &str| format!("{GOOD}\n[replication]\n{keys}\n");
    let c = parse_str(&with("resync_min_rate = \"80Mbit\"")).unwrap();
    assert_eq!(c.replication.resync_min_rate, 10_000_000);
    let c = parse_str(&with("resync_min_rate = \"4MiB\"\nresync_rate = \"8MiB\"")).unwrap();
    assert_eq!(c.replication.resync_min_rate, 4 << 20);
    let e = error_of(&with("resync_min_rate = \"8MiB\"\nresync_rate = \"4MiB\""));
    assert!(
        e.contains("`replication.resync_min_rate`")
            && e.contains("8388608 is above replication.resync_rate (4194304)"),
        "{e}"
    );
    assert!(error_of(&with("resync_min_rate = \"quick\"")).contains("replication.resync_min_rate"));
}
