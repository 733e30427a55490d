use super::*;
use serde_json::{Value, json};

/// An allocation as `/v1/node/:id/allocations` returns it (the fields read here), running
/// tasks `web` and `log` of group `app` in host mode on 10.0.0.5.
fn alloc(job_meta: Value, group_meta: Value, web_meta: Value) -> Allocation {
    serde_json::from_value(json!({
        "ID": "a1b2", "Namespace": "default", "NodeID": "n-1", "NodeName": "client-1",
        "JobID": "shop", "TaskGroup": "app", "DesiredStatus": "run", "ClientStatus": "running",
        "ModifyIndex": 42,
        "Job": {"ID": "shop", "Meta": job_meta, "TaskGroups": [
            {"Name": "app", "Meta": group_meta, "Tasks": [
                {"Name": "web", "Meta": web_meta},
                {"Name": "log", "Meta": null}
            ]}
        ]},
        "TaskStates": {"web": {"State": "running", "Restarts": 1}, "log": {"State": "running", "Restarts": 0}},
        "AllocatedResources": {"Shared": {"Networks": [{"Mode": "host", "IP": "10.0.0.5"}]}},
        "NetworkStatus": null
    }))
    .unwrap()
}

fn resolved(a: &Allocation) -> Vec<Target> {
    let declared = declaration(a).unwrap().expect("opted in");
    targets(a, &declared).unwrap()
}

#[test]
fn job_meta_opts_the_whole_allocation_in_with_group_meta_winning() {
    let a = alloc(
        json!({"workersd_service": "clever", "workersd_ports": "9011-9020", "workersd_path": "/m", "owner": "x"}),
        json!({"workersd_path": "/metrics", "workersd_meta_team": "web"}),
        Value::Null,
    );
    let (t,) = <[Target; 1]>::try_from(resolved(&a))
        .map(|[t]| (t,))
        .unwrap();
    assert_eq!(t.service, "clever");
    assert_eq!(t.path, "/metrics", "group over job");
    assert_eq!(t.address.to_string(), "10.0.0.5");
    assert_eq!(t.ports.to_string(), "9011-9020");
    assert_eq!(t.meta["team"], "web");
    for (key, value) in [
        ("nomad-job", "shop"),
        ("nomad-group", "app"),
        ("nomad-alloc-id", "a1b2"),
        ("nomad-namespace", "default"),
        ("nomad-node", "client-1"),
    ] {
        assert_eq!(t.meta[key], value, "{key}");
    }
    assert!(!t.meta.contains_key("nomad-task"));
    assert_eq!(t.revision, 1, "restarts of the running tasks");
}

#[test]
fn a_task_declares_its_own_range_and_runs_only_while_that_task_runs() {
    let mut a = alloc(
        json!({"workersd_service": "clever"}),
        json!({"workersd_ports_log": "9100"}),
        json!({"workersd_ports": "9011-9020"}),
    );
    let found: Vec<(String, String)> = resolved(&a)
        .into_iter()
        .map(|t| (t.meta["nomad-task"].clone(), t.ports.to_string()))
        .collect();
    assert_eq!(
        found,
        [
            ("log".into(), "9100".into()),
            ("web".into(), "9011-9020".into())
        ]
    );
    a.task_states
        .as_mut()
        .unwrap()
        .get_mut("web")
        .unwrap()
        .state = "dead".into();
    let left: Vec<String> = resolved(&a)
        .into_iter()
        .map(|t| t.meta["nomad-task"].clone())
        .collect();
    assert_eq!(left, ["log"]);
}

#[test]
fn bridge_mode_publishes_the_allocation_address() {
    let mut a = alloc(
        json!({"workersd_service": "clever", "workersd_ports": "9011-9012"}),
        Value::Null,
        Value::Null,
    );
    a.network_status = Some(NetworkStatus {
        address: "172.26.64.3".into(),
    });
    assert_eq!(resolved(&a)[0].address.to_string(), "172.26.64.3");
    a.network_status = None;
    a.allocated_resources = None;
    let declared = declaration(&a).unwrap().unwrap();
    assert!(matches!(targets(&a, &declared), Err(AllocError::NoAddress)));
}

#[test]
fn stopped_lost_or_completed_allocations_have_no_targets() {
    let meta = json!({"workersd_service": "clever", "workersd_ports": "9011-9012"});
    for (client, desired) in [
        ("complete", "run"),
        ("failed", "run"),
        ("lost", "run"),
        ("pending", "run"),
        ("running", "stop"),
    ] {
        let mut a = alloc(meta.clone(), Value::Null, Value::Null);
        a.client_status = client.into();
        a.desired_status = desired.into();
        assert!(resolved(&a).is_empty(), "{client}/{desired}");
    }
}

#[test]
fn bad_meta_names_the_key_where_it_was_written_and_spares_other_allocations() {
    let bad = alloc(
        json!({"workersd_service": "clever", "workersd_ports": "9020-9011"}),
        json!({"workersd_sheme": "https"}),
        json!({"workersd_path": "/x"}),
    );
    let errors: Vec<String> = declaration(&bad)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errors,
        [
            "task[\"web\"].meta.workersd_path: a task's meta may only declare its own range (workersd_ports); set the other workersd_ keys on the group or the job",
            "group[\"app\"].meta.workersd_sheme: unknown workersd_ meta key (expected workersd_service, workersd_ports, workersd_ports_<task>, workersd_path, workersd_scheme, workersd_tags, workersd_meta_<key>)",
            "job.meta.workersd_ports: range 9020-9011 is reversed (start must not exceed end)",
        ]
        .map(String::from),
        "{errors:#?}"
    );
    let mut good = alloc(
        json!({"workersd_service": "clever", "workersd_ports": "9011-9012"}),
        Value::Null,
        Value::Null,
    );
    good.id = "good".into();
    let unknown_task = alloc(
        json!({"workersd_service": "clever", "workersd_ports_db": "9011"}),
        Value::Null,
        Value::Null,
    );
    let not_opted = alloc(Value::Null, json!({"team": "x"}), Value::Null);
    let (found, problems) = resolve(&[bad, good, unknown_task, not_opted]);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].meta["nomad-alloc-id"], "good");
    assert_eq!(problems.len(), 1, "one key per allocation ID: {problems:?}");
    assert!(
        problems["a1b2"]
            .to_string()
            .contains("no task named \"db\""),
        "{problems:?}"
    );
}
