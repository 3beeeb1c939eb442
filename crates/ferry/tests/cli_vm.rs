//! `ferry vm ...` against a real `ferryd`: define (flags and JSON), list
//! (`--json` and table), show, start, stop, delete, exit codes. The VM is a
//! firmware boot (SeaBIOS, QEMU under TCG) of an empty pool volume: it runs
//! but never shuts down on ACPI, so `stop` reports that it killed it.

mod common;

use common::{daemon, qemus_of};
use serde_json::json;

#[test]
fn vm_define_list_start_stop_delete() {
    let d = daemon();
    d.json(&["volume", "create", "boot-1", "16M"]);
    let v = d.json(&[
        "vm", "define", "fw-1", "--disk", "boot-1", "--memory", "64M", "--accel", "tcg",
    ]);
    assert_eq!(v["state"], "defined", "{v}");
    assert_eq!(v["definition"]["memory_mib"], 64);
    assert_eq!(v["definition"]["boot"]["kind"], "firmware");
    assert_eq!(v["disks"][0]["volume"], "boot-1");

    // A second VM from JSON; its volume is the first VM's: refused.
    let file = d.dir.path().join("vm.json");
    let def = json!({"name": "fw-2", "disks": ["boot-1"], "boot": {"kind": "firmware"}});
    std::fs::write(&file, def.to_string()).unwrap();
    let taken = d.ferry(&["vm", "define", "--from-json", file.to_str().unwrap()]);
    assert_eq!(taken.status.code(), Some(1));
    let err = String::from_utf8_lossy(&taken.stderr);
    assert!(err.contains("VM fw-1") && err.contains("409"), "{err}");
    d.json(&["volume", "create", "boot-2", "16M"]);
    let def = json!({"name": "fw-2", "disks": ["boot-2"], "boot": {"kind": "firmware"},
                     "accel": "tcg", "memory_mib": 64});
    std::fs::write(&file, def.to_string()).unwrap();
    let v2 = d.json(&["vm", "define", "--from-json", file.to_str().unwrap()]);
    assert_eq!(v2["name"], "fw-2");

    let list = d.json(&["vm", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fw-1", "fw-2"]);

    let started = d.json(&["vm", "start", "fw-1"]);
    assert_eq!(started["state"], "running", "{started}");
    let pid = started["pid"].as_u64().unwrap();
    let shown = d.json(&["vm", "show", "fw-1"]);
    assert_eq!(shown["pid"].as_u64(), Some(pid));
    assert_eq!(shown["qmp_status"], "running");

    let table = String::from_utf8(d.ferry(&["vm", "list"]).stdout).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    let row = table.lines().find(|l| l.starts_with("fw-1")).unwrap();
    assert!(
        row.contains("running") && row.contains(&pid.to_string()),
        "{table}"
    );
    let human = String::from_utf8(d.ferry(&["vm", "show", "fw-1"]).stdout).unwrap();
    assert!(human.contains("serial log"), "{human}");

    let busy = d.ferry(&["vm", "delete", "fw-1"]);
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("running"));

    // SeaBIOS with nothing to boot ignores ACPI: stop ends in a kill.
    let stopped = d.json(&["vm", "stop", "fw-1", "--timeout", "2"]);
    println!("stop: {stopped}");
    assert_eq!(stopped["outcome"], "killed", "{stopped}");
    assert_eq!(stopped["vm"]["state"], "stopped");
    assert!(qemus_of(d.dir.path()).is_empty());

    let missing = d.ferry(&["vm", "show", "ghost"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));

    d.json(&["vm", "delete", "fw-1"]);
    d.json(&["vm", "delete", "fw-2"]);
    assert_eq!(d.json(&["vm", "list"]), json!([]));
    d.json(&["volume", "delete", "boot-1"]);
}
