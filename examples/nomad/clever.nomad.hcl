# A gunicorn service with a workersd sidecar in standalone mode. Each allocation's sidecar
# probes its own workers (on the allocation's IP) and registers them with the node-local
# Consul agent; --deregister-on-exit removes exactly this allocation's entries when it stops.
#
#   nomad job run examples/nomad/clever.nomad.hcl
#   workersd check --targets <rendered local/targets.yaml>   # what the template renders
job "clever" {
  datacenters = ["dc1"]
  type        = "service"

  group "web" {
    count = 2

    network {
      port "http" {}
    }

    task "app" {
      driver = "raw_exec"
      config {
        command = "gunicorn"
        args = [
          "-c", "${NOMAD_TASK_DIR}/gunicorn.conf.py",
          "--bind", "${NOMAD_ADDR_http}",
          "--workers", "4",
          "--max-requests", "1000",
          "app:app",
        ]
      }
      env {
        # One metrics server per worker, on the first free port of this range.
        WORKER_METRICS_ADDR  = "${NOMAD_IP_http}"
        WORKER_METRICS_PORTS = "9011-9020"
      }
      artifact {
        # Your app and examples/gunicorn/gunicorn.conf.py.
        source      = "https://artifacts.example/clever.tar.gz"
        destination = "local/"
      }
    }

    task "workersd" {
      driver = "raw_exec"
      lifecycle {
        hook    = "poststart"
        sidecar = true
      }
      config {
        command = "workersd"
        args = [
          "standalone",
          "--targets", "${NOMAD_TASK_DIR}/targets.yaml",
          # The Consul agent on this client node.
          "--consul-addr", "http://${attr.unique.network.ip-address}:8500",
          # One synthetic node per Nomad client, one owner per allocation.
          "--consul-node", "workersd-${node.unique.name}",
          "--owner-id", "nomad-${NOMAD_ALLOC_ID}",
          "--deregister-on-exit",
          # Only the allocation's own loopback listeners; no HTTP SD needed with Consul.
          "--listen", "127.0.0.1:0",
          "--http-sd-listen", "off",
          "--log-format", "json",
        ]
      }
      template {
        destination = "local/targets.yaml"
        change_mode = "noop" # workersd re-reads the file itself
        data        = <<-EOT
          targets:
            - service: clever
              address: {{ env "NOMAD_IP_http" }}
              ports: 9011-9020
              tags: [gunicorn]
              meta:
                nomad-alloc: {{ env "NOMAD_ALLOC_ID" }}
                nomad-job: {{ env "NOMAD_JOB_NAME" }}
        EOT
      }
      resources {
        cpu    = 50
        memory = 32
      }
    }
  }
}
