{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "workersd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; the release name when it already contains the chart name. */}}
{{- define "workersd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "workersd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "workersd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "workersd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "workersd.labels" -}}
helm.sh/chart: {{ include "workersd.chart" . }}
{{ include "workersd.selectorLabels" . }}
app.kubernetes.io/version: {{ include "workersd.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "workersd.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "workersd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "workersd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The RBAC rules of the watched namespaces: exactly what workersd calls (README, "RBAC"):
pods and WorkerMetrics are listed and watched, WorkerMetrics status is merge-patched, and
invalid objects get deduplicated events.k8s.io Events (created, then patched).
*/}}
{{- define "workersd.watchRules" -}}
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [workersd.io]
  resources: [workermetrics]
  verbs: [list, watch]
- apiGroups: [workersd.io]
  resources: [workermetrics/status]
  verbs: [patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/*
mode: daemonset only: the janitor lists and watches Nodes to remove the Consul entries of
deleted nodes (README, "Node-local mode"). Nodes are cluster-scoped: a ClusterRole rule.
*/}}
{{- define "workersd.nodeRules" -}}
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
{{- end }}

{{/* Checks of relations the JSON schema cannot express. */}}
{{- define "workersd.validate" -}}
{{- if eq .Values.mode "daemonset" }}
{{- if not .Values.leaderElection.enabled }}
{{- fail "mode=daemonset needs leaderElection.enabled=true: the janitor that removes the entries of deleted nodes is elected through the Lease" }}
{{- end }}
{{- if .Values.watchNamespaces }}
{{- fail "mode=daemonset watches pods in all namespaces: unset watchNamespaces (its janitor needs a ClusterRole for nodes anyway, and per-namespace watches would cost nodes x namespaces watches)" }}
{{- end }}
{{- if .Values.consul.node }}
{{- fail "mode=daemonset publishes each node under its own Consul node workersd-<clusterName>_<node>: unset consul.node" }}
{{- end }}
{{- if .Values.podDisruptionBudget.enabled }}
{{- fail "mode=daemonset has no PodDisruptionBudget (kubectl drain skips DaemonSet pods): set podDisruptionBudget.enabled=false" }}
{{- end }}
{{- end }}
{{- if and (eq .Values.mode "deployment") (not .Values.leaderElection.enabled) (gt (int .Values.replicaCount) 1) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled=true: without a leader every replica probes and writes" }}
{{- end }}
{{- if and (not .Values.consul.address) (not .Values.httpSd.enabled) }}
{{- fail "nothing would publish the live workers: set consul.address or httpSd.enabled=true" }}
{{- end }}
{{- if and .Values.httpSd.enabled (eq (int .Values.httpSd.port) (int .Values.metrics.port)) }}
{{- fail "httpSd.port and metrics.port must differ" }}
{{- end }}
{{- if and (or .Values.consul.tokenSecret.name .Values.consul.tls.caSecret .Values.consul.tls.clientCertSecret) (not .Values.consul.address) }}
{{- fail "consul.tokenSecret and consul.tls need consul.address" }}
{{- end }}
{{- end }}
