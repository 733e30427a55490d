# A gunicorn service opted in by meta: the workersd system job (workersd.nomad.hcl) on each
# client node finds its allocations and registers each live worker. No sidecar.
#
#   nomad job run examples/nomad/clever-meta.nomad.hcl
job "clever" {
  datacenters = ["dc1"]
  type        = "service"

  meta {
    workersd_service = "clever"
    workersd_tags    = "gunicorn"
  }

  group "web" {
    count = 2

    network {
      port "http" {}
      # The workers' metrics range, reserved on the host so no other allocation takes it;
      # workersd probes it on this address (host mode: the network's IP; bridge mode: the
      # allocation's own address).
      port "w0" { static = 9011 }
      port "w1" { static = 9012 }
      port "w2" { static = 9013 }
      port "w3" { static = 9014 }
    }

    task "app" {
      driver = "raw_exec"
      meta {
        # This task's range (a task may declare only its own range).
        workersd_ports = "9011-9014"
      }
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
        WORKER_METRICS_ADDR  = "${NOMAD_IP_http}"
        WORKER_METRICS_PORTS = "9011-9014"
      }
      artifact {
        source      = "https://artifacts.example/clever.tar.gz"
        destination = "local/"
      }
    }
  }
}
