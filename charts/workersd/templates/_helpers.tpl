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

{{/* Checks of relations the JSON schema cannot express. */}}
{{- define "workersd.validate" -}}
{{- if and (not .Values.leaderElection.enabled) (gt (int .Values.replicaCount) 1) }}
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
