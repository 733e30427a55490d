# workersd as a Nomad system job: one instance per client node follows that node's
# allocations (blocking queries on the local Nomad agent) and registers the live workers of
# every allocation that opts in with workersd_* meta (see clever-meta.nomad.hcl) with the
# node's Consul agent, so the entries live and die with the node.
#
#   nomad job run examples/nomad/workersd.nomad.hcl
job "workersd" {
  datacenters = ["dc1"]
  type        = "system"

  group "workersd" {
    task "workersd" {
      driver = "raw_exec"
      config {
        command = "workersd"
        args = [
          "nomad",
          # The Nomad and Consul agents of this client node.
          "--nomad-addr", "http://${attr.unique.network.ip-address}:4646",
          "--consul-addr", "http://${attr.unique.network.ip-address}:8500",
          "--consul-registration", "agent",
          "--nomad-token-file", "${NOMAD_SECRETS_DIR}/nomad-token",
          "--listen", "127.0.0.1:9463",
          "--http-sd-listen", "off",
          "--log-format", "json",
        ]
      }
      # A token with node:read and read-job on the namespaces to publish.
      template {
        destination = "secrets/nomad-token"
        data        = "{{ with nomadVar \"nomad/jobs/workersd\" }}{{ .token }}{{ end }}"
      }
      resources {
        cpu    = 50
        memory = 32
      }
    }
  }
}
