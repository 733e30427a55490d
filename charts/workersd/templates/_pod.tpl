{{/*
The pod template shared by the Deployment (mode: deployment) and the DaemonSet
(mode: daemonset): the same hardened pod. The DaemonSet's pod adds NODE_NAME and --node-name and
has no --leader-election (no instance is elected to probe; the Lease elects the janitor).
*/}}
{{- define "workersd.podTemplate" -}}
{{- $consulTokenDir := "/etc/workersd/consul-token" }}
{{- $daemonset := eq .Values.mode "daemonset" }}
metadata:
  labels:
    {{- include "workersd.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "workersd.serviceAccountName" . }}
  # The ServiceAccount does not mount its token anywhere; this pod does: the controller
  # lists and watches pods and WorkerMetrics and holds the Lease.
  automountServiceAccountToken: true
  # Every workersd flag has an environment fallback: keep Service variables out.
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    fsGroup: 65532
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: workersd
      image: "{{ .Values.image.repository }}:{{ include "workersd.imageTag" . }}"
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: [workersd]
      args:
        - kubernetes
        - --cluster-name
        - {{ .Values.clusterName | quote }}
        {{- with .Values.watchNamespaces }}
        - --namespaces
        - {{ join "," . | quote }}
        {{- end }}
        - --service-name-template
        - {{ .Values.serviceNameTemplate | quote }}
        {{- if .Values.allowHostNetwork }}
        - --allow-host-network
        {{- end }}
        {{- if $daemonset }}
        # Node-local: this node's pods only (the kubelet expands $(NODE_NAME) from env).
        - --node-name=$(NODE_NAME)
        {{- else }}
        - --leader-election
        - {{ .Values.leaderElection.enabled | quote }}
        {{- end }}
        {{- if .Values.leaderElection.enabled }}
        - --lease-namespace
        - {{ .Release.Namespace | quote }}
        - --lease-name
        - {{ include "workersd.fullname" . | quote }}
        - --lease-duration
        - {{ .Values.leaderElection.leaseDuration | quote }}
        {{- end }}
        - --listen
        - "0.0.0.0:{{ .Values.metrics.port }}"
        - --http-sd-listen
        {{- if .Values.httpSd.enabled }}
        - "0.0.0.0:{{ .Values.httpSd.port }}"
        {{- else }}
        - "off"
        {{- end }}
        {{- with .Values.consul.address }}
        - --consul-addr
        - {{ . | quote }}
        {{- end }}
        {{- with .Values.consul.datacenter }}
        - --consul-datacenter
        - {{ . | quote }}
        {{- end }}
        {{- with .Values.consul.node }}
        - --consul-node
        - {{ . | quote }}
        {{- end }}
        {{- if .Values.consul.tls.caSecret }}
        - --consul-ca-file
        - /etc/workersd/consul-tls/ca/ca.crt
        {{- end }}
        {{- if .Values.consul.tls.clientCertSecret }}
        - --consul-client-cert
        - /etc/workersd/consul-tls/client/tls.crt
        - --consul-client-key
        - /etc/workersd/consul-tls/client/tls.key
        {{- end }}
        {{- with .Values.consul.tls.serverName }}
        - --consul-tls-server-name
        - {{ . | quote }}
        {{- end }}
        {{- if .Values.consul.tokenSecret.name }}
        - --consul-token-file
        - "{{ $consulTokenDir }}/token"
        {{- end }}
        - --probe-interval
        - {{ .Values.probe.interval | quote }}
        - --probe-timeout
        - {{ .Values.probe.timeout | quote }}
        - --probe-concurrency
        - {{ .Values.probe.concurrency | quote }}
        - --fast-interval
        - {{ .Values.probe.fastInterval | quote }}
        - --fast-period
        - {{ .Values.probe.fastPeriod | quote }}
        - --full-sweep-interval
        - {{ .Values.probe.fullSweepInterval | quote }}
        - --liveness
        - {{ .Values.probe.liveness | quote }}
        - --log-format
        - {{ .Values.logFormat | quote }}
        {{- range .Values.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        # The Lease holder identity and the Events' reporting instance (--identity).
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- if $daemonset }}
        # The node this instance serves (downward API), passed as --node-name.
        - name: NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: metrics
          containerPort: {{ .Values.metrics.port }}
          protocol: TCP
        {{- if .Values.httpSd.enabled }}
        - name: http-sd
          containerPort: {{ .Values.httpSd.port }}
          protocol: TCP
        {{- end }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        initialDelaySeconds: 5
        periodSeconds: 10
        timeoutSeconds: 3
        failureThreshold: 3
      # 200 once every target was probed and written; 503 before, and on the standby.
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 2
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        privileged: false
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: [ALL]
        seccompProfile:
          type: RuntimeDefault
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if or .Values.consul.tokenSecret.name .Values.consul.tls.caSecret .Values.consul.tls.clientCertSecret }}
      volumeMounts:
        {{- if .Values.consul.tokenSecret.name }}
        - name: consul-token
          mountPath: {{ $consulTokenDir }}
          readOnly: true
        {{- end }}
        {{- if .Values.consul.tls.caSecret }}
        - name: consul-ca
          mountPath: /etc/workersd/consul-tls/ca
          readOnly: true
        {{- end }}
        {{- if .Values.consul.tls.clientCertSecret }}
        - name: consul-client-cert
          mountPath: /etc/workersd/consul-tls/client
          readOnly: true
        {{- end }}
      {{- end }}
  {{- if or .Values.consul.tokenSecret.name .Values.consul.tls.caSecret .Values.consul.tls.clientCertSecret }}
  volumes:
    {{- with .Values.consul.tokenSecret }}
    {{- if .name }}
    - name: consul-token
      secret:
        secretName: {{ .name }}
        defaultMode: 0440
        items:
          - key: {{ .key }}
            path: token
    {{- end }}
    {{- end }}
    {{- with .Values.consul.tls.caSecret }}
    - name: consul-ca
      secret:
        secretName: {{ . }}
        defaultMode: 0440
    {{- end }}
    {{- with .Values.consul.tls.clientCertSecret }}
    - name: consul-client-cert
      secret:
        secretName: {{ . }}
        defaultMode: 0440
    {{- end }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if or .Values.affinity (not $daemonset) }}
  affinity:
    {{- if .Values.affinity }}
    {{- toYaml .Values.affinity | nindent 4 }}
    {{- else }}
    # Default: keep the leader and the standby on different nodes when possible.
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "workersd.selectorLabels" . | nindent 16 }}
    {{- end }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
