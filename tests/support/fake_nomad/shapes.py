"""JSON shapes of Nomad API objects, as the agent's HTTP API encodes them (see CONTRACT.md).

Field names and nesting follow hashicorp/nomad nomad/structs (Allocation in alloc.go; Job,
TaskGroup, Task, NetworkResource, Port, AllocatedPortMapping, TaskState in structs.go):
the HTTP API encodes the Go structs with their field names (PascalCase), a nil map or
slice as null and a zero time.Time as "0001-01-01T00:00:00Z".
"""

from __future__ import annotations

import copy
import datetime

ZERO_TIME = "0001-01-01T00:00:00Z"


def go_time(ns: int | None) -> str:
    """time.Time's JSON form (RFC 3339 with nanoseconds, trailing zeros trimmed)."""
    if not ns:
        return ZERO_TIME
    secs, frac = divmod(ns, 1_000_000_000)
    base = datetime.datetime.fromtimestamp(secs, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    frac_s = f"{frac:09d}".rstrip("0")
    return f"{base}.{frac_s}Z" if frac_s else f"{base}Z"


def _meta(m):
    # A jobspec without a meta block leaves the Go map nil: JSON null.
    return dict(m) if m else None


def port_json(p: dict) -> dict:
    return {"Label": p["label"], "Value": int(p.get("value", 0)), "To": int(p.get("to", 0)),
            "HostNetwork": p.get("host_network", "default"), "IgnoreCollision": False}


def network_json(net: dict, *, spec: bool) -> dict:
    """A NetworkResource. spec=True is the job's (dynamic ports have Value 0 until placed)."""
    reserved = [port_json(p) for p in net.get("reserved", [])]
    dynamic = [port_json(dict(p, value=0) if spec else p) for p in net.get("dynamic", [])]
    return {
        "Mode": net.get("mode", "host"),
        "Device": "" if spec else net.get("device", "eth0" if net.get("mode", "host") == "host" else ""),
        "CIDR": "",
        "IP": "" if spec else net.get("ip", ""),
        "MBits": 0,
        "DNS": None,
        "ReservedPorts": reserved or None,
        "DynamicPorts": dynamic or None,
        "CNI": None,
    }


def allocated_ports(net: dict) -> list:
    """AllocatedResources.Shared.Ports: one AllocatedPortMapping per port, HostIP the network's IP."""
    out = []
    for p in list(net.get("reserved", [])) + list(net.get("dynamic", [])):
        out.append({"Label": p["label"], "Value": int(p["value"]), "To": int(p.get("to", 0)),
                    "HostIP": net.get("ip", ""), "IgnoreCollision": False})
    return out


def task_json(name: str, meta) -> dict:
    return {
        "Name": name, "Driver": "raw_exec", "User": "", "Config": {"command": "/bin/true"},
        "Env": None, "Services": None, "Vault": None, "Consul": None, "Templates": None,
        "Constraints": None, "Affinities": None,
        "Resources": {"CPU": 100, "Cores": 0, "MemoryMB": 300, "MemoryMaxMB": 0, "DiskMB": 0,
                      "IOPS": 0, "Networks": None, "Devices": None, "NUMA": None},
        "RestartPolicy": {"Attempts": 2, "Interval": 1800000000000, "Delay": 15000000000,
                          "Mode": "fail", "RenderTemplates": False},
        "DispatchPayload": None, "Lifecycle": None, "Meta": _meta(meta),
        "KillTimeout": 5000000000, "LogConfig": {"MaxFiles": 10, "MaxFileSizeMB": 10, "Disabled": False},
        "Artifacts": None, "Leader": False, "ShutdownDelay": 0, "VolumeMounts": None,
        "ScalingPolicies": None, "KillSignal": "", "Kind": "", "CSIPluginConfig": None,
        "Identity": None, "Identities": None, "Actions": None, "Schedule": None,
    }


def job_json(a: dict) -> dict:
    """The Job embedded in an Allocation (the job version the allocation was placed from)."""
    meta = a["meta"]
    net = a.get("network")
    group = {
        "Name": a["group"], "Count": 1, "Update": None, "Migrate": None, "Constraints": None,
        "Scaling": None,
        "RestartPolicy": {"Attempts": 2, "Interval": 1800000000000, "Delay": 15000000000,
                          "Mode": "fail", "RenderTemplates": False},
        "Disconnect": None,
        "Tasks": [task_json(t, meta.get("tasks", {}).get(t)) for t in a["tasks"]],
        "EphemeralDisk": {"Sticky": False, "SizeMB": 300, "Migrate": False},
        "Meta": _meta(meta.get("group")),
        "ReschedulePolicy": None, "Affinities": None, "Spreads": None,
        "Networks": [network_json(net, spec=True)] if net else None,
        "Consul": {"Namespace": "", "Cluster": "default", "Partition": ""},
        "Services": None, "Volumes": None, "ShutdownDelay": None,
        "StopAfterClientDisconnect": None, "MaxClientDisconnect": None,
        "PreventRescheduleOnLost": False,
    }
    return {
        "Region": a["region"], "Namespace": a["namespace"], "ID": a["job"], "ParentID": "",
        "Name": a["job"], "Type": a.get("job_type", "service"), "Priority": 50, "AllAtOnce": False,
        "Datacenters": ["*"], "NodePool": "default", "Constraints": None, "Affinities": None,
        "Spreads": None, "TaskGroups": [group], "Update": None, "Multiregion": None,
        "Periodic": None, "ParameterizedJob": None, "Dispatched": False,
        "DispatchIdempotencyToken": "", "Payload": None, "Meta": _meta(meta.get("job")),
        "ConsulToken": "", "ConsulNamespace": "", "VaultToken": "", "VaultNamespace": "",
        "NomadTokenID": "", "Status": "running", "StatusDescription": "", "Stable": False,
        "Version": a["job_version"], "SubmitTime": a["create_time"], "CreateIndex": a["job_create_index"],
        "ModifyIndex": a["job_modify_index"], "JobModifyIndex": a["job_modify_index"], "UI": None,
    }


def task_state_json(ts: dict) -> dict:
    return {
        "State": ts["state"], "Failed": bool(ts.get("failed", False)),
        "Restarts": int(ts.get("restarts", 0)), "LastRestart": go_time(ts.get("last_restart")),
        "StartedAt": go_time(ts.get("started_at")), "FinishedAt": go_time(ts.get("finished_at")),
        "Events": [{"Type": e["type"], "Time": e["time"], "Message": "", "DisplayMessage": e.get("display", ""),
                    "Details": {}, "FailsTask": False, "RestartReason": "", "SetupError": "",
                    "DriverError": "", "ExitCode": 0, "Signal": 0, "KillTimeout": 0, "KillError": "",
                    "KillReason": "", "StartDelay": 0, "DownloadError": "", "ValidationError": "",
                    "DiskLimit": 0, "FailedSibling": "", "VaultError": "", "TaskSignalReason": "",
                    "TaskSignal": "", "DriverMessage": "", "GenericSource": ""}
                   for e in ts.get("events", [])] or None,
        "TaskHandle": None,
    }


def alloc_json(a: dict, node_name: str) -> dict:
    """A full Allocation as GET /v1/allocation/:id and /v1/node/:id/allocations return it."""
    net = a.get("network")
    shared_nets = [network_json(net, spec=False)] if net else None
    status = None
    if net and net.get("mode") == "bridge":
        status = {"InterfaceName": "eth0", "Address": net.get("address", ""), "AddressIPv6": "", "DNS": None}
    tasks_res = {t: {"Cpu": {"CpuShares": 100, "ReservedCores": None},
                     "Memory": {"MemoryMB": 300, "MemoryMaxMB": 0},
                     "Networks": None, "Devices": None} for t in a["tasks"]}
    return {
        "ID": a["id"], "Namespace": a["namespace"], "EvalID": a["eval_id"],
        "Name": f"{a['job']}.{a['group']}[{a.get('index', 0)}]", "NodeID": a["node_id"],
        "NodeName": node_name, "JobID": a["job"], "Job": job_json(a), "TaskGroup": a["group"],
        # Deprecated upgrade-path fields (nomad/structs/alloc.go): nil for allocations placed
        # by a scheduler since 0.9, which fills AllocatedResources instead.
        "Resources": None, "SharedResources": None, "TaskResources": None,
        "AllocatedResources": {"Tasks": tasks_res,
                               "Shared": {"Networks": shared_nets, "DiskMB": 300,
                                          "Ports": (allocated_ports(net) or None) if net else None}},
        "Metrics": {"NodesEvaluated": 1, "NodesFiltered": 0, "NodesInPool": 1, "NodesAvailable": {"dc1": 1},
                    "ClassFiltered": None, "ConstraintFiltered": None, "NodesExhausted": 0,
                    "ClassExhausted": None, "DimensionExhausted": None, "QuotaExhausted": None,
                    "ResourcesExhausted": None, "Scores": None, "ScoreMetaData": None,
                    "AllocationTime": 100000, "CoalescedFailures": 0},
        "DesiredStatus": a["desired_status"], "DesiredDescription": a.get("desired_description", ""),
        "DesiredTransition": {"Migrate": None, "Reschedule": None, "ForceReschedule": None,
                              "NoShutdownDelay": None, "MigrateDisablePlacement": None},
        "ClientStatus": a["client_status"], "ClientDescription": a.get("client_description", ""),
        "TaskStates": {t: task_state_json(ts) for t, ts in a["task_states"].items()} or None,
        "AllocStates": None, "PreviousAllocation": "", "NextAllocation": "", "DeploymentID": "",
        "DeploymentStatus": None, "RescheduleTracker": None, "NetworkStatus": status,
        "FollowupEvalID": "", "PreemptedAllocations": None, "PreemptedByAllocation": "",
        "SigningKeyID": "", "CreateIndex": a["create_index"], "ModifyIndex": a["modify_index"],
        "AllocModifyIndex": a["alloc_modify_index"], "CreateTime": a["create_time"],
        "ModifyTime": a["modify_time"],
    }


def alloc_stub_json(a: dict, node_name: str, *, resources=False, task_states=True) -> dict:
    """AllocListStub (Allocation.Stub in nomad/structs/alloc.go) for GET /v1/allocations."""
    full = alloc_json(a, node_name)
    stub = {k: full[k] for k in (
        "ID", "EvalID", "Name", "Namespace", "NodeID", "NodeName", "JobID")}
    stub.update({"JobType": full["Job"]["Type"], "JobVersion": full["Job"]["Version"],
                 "TaskGroup": full["TaskGroup"]})
    stub["AllocatedResources"] = copy.deepcopy(full["AllocatedResources"]) if resources else None
    for k in ("DesiredStatus", "DesiredDescription", "ClientStatus", "ClientDescription",
              "DesiredTransition", "TaskStates", "DeploymentStatus", "FollowupEvalID",
              "NextAllocation", "RescheduleTracker", "PreemptedAllocations", "PreemptedByAllocation",
              "CreateIndex", "ModifyIndex", "CreateTime", "ModifyTime"):
        stub[k] = full[k]
    if not task_states:
        stub["TaskStates"] = None
    return stub


def node_json(n: dict) -> dict:
    """A Node as GET /v1/node/:id returns it (Sanitize()d: SecretID blanked)."""
    return {
        "ID": n["id"], "SecretID": "", "Datacenter": n["datacenter"], "Name": n["name"],
        "HTTPAddr": f"{n['ip']}:4646", "TLSEnabled": False,
        "Attributes": {"unique.network.ip-address": n["ip"], "kernel.name": "linux",
                       "nomad.version": n["version"], "os.name": "debian"},
        "NodeResources": {"Cpu": {"CpuShares": 4000, "TotalCpuCores": 2, "ReservableCpuCores": [0, 1]},
                          "Memory": {"MemoryMB": 8000}, "Disk": {"DiskMB": 50000},
                          "Networks": [{"Mode": "host", "Device": "eth0", "CIDR": f"{n['ip']}/32",
                                        "IP": n["ip"], "Hostname": "", "MBits": 1000, "DNS": None,
                                        "ReservedPorts": None, "DynamicPorts": None, "CNI": None}],
                          "NodeNetworks": None, "Devices": None, "NUMA": None,
                          "MinDynamicPort": 20000, "MaxDynamicPort": 32000},
        "ReservedResources": {"Cpu": {"CpuShares": 0, "ReservedCpuCores": None}, "Memory": {"MemoryMB": 0},
                              "Disk": {"DiskMB": 0}, "Networks": {"ReservedHostPorts": ""}},
        "Resources": None, "Reserved": None, "Links": {}, "Meta": dict(n.get("meta") or {}),
        "NodeClass": "", "NodePool": "default", "CgroupParent": "", "ComputedClass": "v1:0",
        "DrainStrategy": None, "SchedulingEligibility": "eligible", "Status": n["status"],
        "StatusDescription": "", "StatusUpdatedAt": n["status_updated_at"], "Events": None,
        "Drivers": {"raw_exec": {"Attributes": None, "Detected": True, "Healthy": True,
                                 "HealthDescription": "Healthy", "UpdateTime": ZERO_TIME}},
        "CSIControllerPlugins": None, "CSINodePlugins": None, "HostVolumes": None,
        "HostNetworks": None, "GCVolumesOnNodeGC": False, "LastDrain": None,
        "CreateIndex": n["create_index"], "ModifyIndex": n["modify_index"],
    }


def node_stub_json(n: dict) -> dict:
    """NodeListStub (Node.Stub) for GET /v1/nodes, without the optional resources/os fields."""
    full = node_json(n)
    return {"Address": n["ip"], "ID": n["id"], "Attributes": None, "Datacenter": n["datacenter"],
            "Name": n["name"], "NodeClass": "", "NodePool": "default", "Version": n["version"],
            "Drain": False, "SchedulingEligibility": "eligible", "Status": n["status"],
            "StatusDescription": "", "Drivers": full["Drivers"], "HostVolumes": None,
            "NodeResources": None, "ReservedResources": None, "LastDrain": None,
            "CreateIndex": n["create_index"], "ModifyIndex": n["modify_index"]}
