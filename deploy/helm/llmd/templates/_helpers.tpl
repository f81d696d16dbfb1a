{{/* Names */}}
{{- define "llmd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llmd.fullname" -}}
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

{{/* Labels on every object. */}}
{{- define "llmd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "llmd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The release's selector labels. */}}
{{- define "llmd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The llm-d.ai/model label value. */}}
{{- define "llmd.modelLabel" -}}
{{- $l := .Values.model.label | default (regexReplaceAll "[^a-z0-9.-]" (lower .Values.model.name) "-") }}
{{- $l | trunc 63 | trimSuffix "-" | trimSuffix "." | trimPrefix "-" }}
{{- end }}

{{- define "llmd.servedModelName" -}}
{{- .Values.model.servedModelName | default .Values.model.name }}
{{- end }}

{{/* Labels of a worker pod; dict: root, role (decode | prefill). */}}
{{- define "llmd.workerSelector" -}}
{{- $root := .root }}
{{ include "llmd.selectorLabels" $root }}
llm-d.ai/inference-serving: "true"
llm-d.ai/model: {{ include "llmd.modelLabel" $root | quote }}
llm-d.ai/role: {{ include "llmd.roleLabel" . }}
{{- end }}

{{/* The llm-d.ai/role value: decode, prefill, or prefill-decode for aggregated workers. */}}
{{- define "llmd.roleLabel" -}}
{{- if not .root.Values.pd.enabled -}}
prefill-decode
{{- else -}}
{{ .role }}
{{- end -}}
{{- end }}

{{- define "llmd.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "llmd.sidecarImage" -}}
{{- $tag := .Values.sidecarImage.tag | default (printf "%s-sidecar" (.Values.image.tag | default .Chart.AppVersion)) }}
{{- printf "%s:%s" (.Values.sidecarImage.repository | default .Values.image.repository) $tag }}
{{- end }}

{{- define "llmd.secretName" -}}
{{- .Values.clusterSecret.existingSecret | default (printf "%s-cluster-secret" (include "llmd.fullname" .)) }}
{{- end }}

{{- define "llmd.secretFile" -}}
/etc/llmd/secret/{{ .Values.clusterSecret.key }}
{{- end }}

{{/* The remote KV tier's URL, or "". */}}
{{- define "llmd.redisUrl" -}}
{{- if .Values.redis.externalUrl -}}
{{ .Values.redis.externalUrl }}
{{- else if .Values.redis.enabled -}}
redis://{{ include "llmd.fullname" . }}-redis:6379
{{- end -}}
{{- end }}

{{/* OpenTelemetry env of an llmd container; dict: root, component. */}}
{{- define "llmd.otelEnv" -}}
{{- $v := .root.Values.tracing }}
{{- if $v.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $v.protocol | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "%s-%s" ($v.serviceNamePrefix | default (include "llmd.fullname" .root)) .component | quote }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_TRACES_SAMPLER
  value: {{ $v.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $v.samplerArg | quote }}
- name: OTEL_PROPAGATORS
  value: tracecontext,baggage
{{- with $v.resourceAttributes }}
{{- $attrs := list }}
{{- range $k, $val := . }}
{{- $attrs = append $attrs (printf "%s=%s" $k $val) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The cluster secret's volume mount (when on). */}}
{{- define "llmd.secretMount" -}}
{{- if .Values.clusterSecret.enabled }}
- name: cluster-secret
  mountPath: /etc/llmd/secret
  readOnly: true
{{- end }}
{{- end }}

{{- define "llmd.secretVolume" -}}
{{- if .Values.clusterSecret.enabled }}
- name: cluster-secret
  secret:
    secretName: {{ include "llmd.secretName" . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* The model cache volume. */}}
{{- define "llmd.modelVolume" -}}
{{- $c := .Values.model.cache }}
- name: model-cache
{{- if eq $c.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.cache.claimName is required with model.cache.type pvc" $c.claimName }}
{{- else if eq $c.type "hostPath" }}
  hostPath:
    path: {{ required "model.cache.hostPath is required with model.cache.type hostPath" $c.hostPath }}
    type: DirectoryOrCreate
{{- else }}
  emptyDir:
    sizeLimit: {{ $c.sizeLimit }}
{{- end }}
{{- end }}

{{- define "llmd.modelEnv" -}}
- name: HF_HOME
  value: {{ .Values.model.cache.mountPath | quote }}
{{- if .Values.model.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- end }}

{{/* One argument list item per element of a list, JSON-quoted. */}}
{{- define "llmd.argList" -}}
{{- range . }}
- {{ toString . | toJson }}
{{- end }}
{{- end }}

{{/* `llmd serve` arguments of a worker; dict: root, role, pd (P/D decode behind a sidecar). */}}
{{- define "llmd.workerArgs" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $w := $v.worker }}
{{- $args := list "serve" "--model" $v.model.name "--served-model-name" (include "llmd.servedModelName" $root) }}
{{- $port := $w.port }}
{{- if and $v.pd.enabled (eq .role "decode") }}
{{- $port = $w.decoderPort }}
{{- end }}
{{- $args = concat $args (list "--port" $port "--device" (ternary "cuda" "cpu" (eq $v.accelerator.type "nvidia"))) }}
{{- $args = concat $args (list "--shutdown-timeout" $w.shutdownTimeout) }}
{{- with $w.maxModelLen }}{{ $args = concat $args (list "--max-model-len" .) }}{{ end }}
{{- with $w.maxNumSeqs }}{{ $args = concat $args (list "--max-num-seqs" .) }}{{ end }}
{{- with $w.kvCacheMemoryGb }}{{ $args = concat $args (list "--kv-cache-memory-gb" .) }}{{ end }}
{{- with $w.gpuMemoryUtilization }}{{ $args = concat $args (list "--gpu-memory-utilization" .) }}{{ end }}
{{- if $w.kvEvents.enabled }}
{{- $ev := dict "enable_kv_cache_events" true "publisher" "zmq" "endpoint" (printf "tcp://*:%v" $w.kvEvents.port) "replay_endpoint" (printf "tcp://*:%v" $w.kvEvents.replayPort) }}
{{- $args = concat $args (list "--kv-events-config" (toJson $ev)) }}
{{- end }}
{{- if $v.pd.enabled }}
{{- $kvRole := ternary $v.pd.prefillKvRole $v.pd.decodeKvRole (eq .role "prefill") }}
{{- $args = concat $args (list "--kv-transfer-config" (toJson (dict "kv_connector" $v.pd.kvConnector "kv_role" $kvRole))) }}
{{- end }}
{{- if $v.clusterSecret.enabled }}
{{- $args = concat $args (list "--kv-transfer-secret-file" (include "llmd.secretFile" $root)) }}
{{- end }}
{{- if gt (float64 $w.kvOffloadingSizeGb) 0.0 }}
{{- $args = concat $args (list "--kv-offloading-size" $w.kvOffloadingSizeGb) }}
{{- end }}
{{- if $v.kvDisk.enabled }}
{{- $args = concat $args (list "--kv-disk-path" $v.kvDisk.mountPath "--kv-disk-gb" $v.kvDisk.sizeGb) }}
{{- end }}
{{- $redis := include "llmd.redisUrl" $root }}
{{- if $redis }}
{{- $args = concat $args (list "--kv-remote-url" $redis) }}
{{- if $v.redis.passwordSecret.name }}
{{- $args = concat $args (list "--kv-remote-password-file" (printf "/etc/llmd/redis/%s" $v.redis.passwordSecret.key)) }}
{{- end }}
{{- end }}
{{- if and $v.router.enabled $v.router.forwardPriority }}
{{- $args = concat $args (list "--scheduling-policy" "priority") }}
{{- end }}
{{- $args = concat $args $w.extraArgs (index $v .role).extraArgs }}
{{- include "llmd.argList" $args }}
{{- end }}

{{/* A worker's pod template; dict: root, role. */}}
{{- define "llmd.workerPod" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $w := $v.worker }}
{{- $r := index $v .role }}
{{- $pdDecode := and $v.pd.enabled (eq .role "decode") }}
{{- $servePort := ternary $w.decoderPort $w.port $pdDecode }}
metadata:
  labels:
    {{- include "llmd.labels" $root | nindent 4 }}
    {{- include "llmd.workerSelector" . | nindent 4 }}
    {{- with $r.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $r.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ add $w.preStopSleepSeconds $w.shutdownTimeout 10 }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with $r.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $r.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $r.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $pdDecode }}
  initContainers:
    # The routing sidecar as a native sidecar: started before the decoder, stopped after it.
    - name: sidecar
      image: {{ include "llmd.sidecarImage" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      restartPolicy: Always
      args:
        {{- $sargs := list "--port" $w.port "--decoder-port" $w.decoderPort "--prefill-timeout" $v.pd.sidecar.prefillTimeout "--prefiller-allowlist" ($v.pd.sidecar.prefillerAllowlist | default (printf "*:%v" $w.port)) }}
        {{- if $v.clusterSecret.enabled }}
        {{- $sargs = concat $sargs (list "--kv-transfer-secret-file" (include "llmd.secretFile" $root)) }}
        {{- end }}
        {{- $sargs = concat $sargs $v.pd.sidecar.extraArgs }}
        {{- include "llmd.argList" $sargs | nindent 8 }}
      {{- if $v.tracing.enabled }}
      env:
        {{- include "llmd.otelEnv" (dict "root" $root "component" "sidecar") | nindent 8 }}
      {{- end }}
      ports:
        - name: http
          containerPort: {{ $w.port }}
          protocol: TCP
      readinessProbe:
        httpGet:
          path: /health
          port: http
        periodSeconds: 5
      livenessProbe:
        tcpSocket:
          port: http
        periodSeconds: 10
      resources:
        {{- toYaml $v.pd.sidecar.resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "llmd.secretMount" $root | nindent 8 }}
        - name: tmp
          mountPath: /tmp
  {{- end }}
  containers:
    - name: llmd
      image: {{ include "llmd.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        {{- include "llmd.workerArgs" . | nindent 8 }}
      env:
        {{- include "llmd.modelEnv" $root | nindent 8 }}
        {{- if $v.pd.enabled }}
        - name: VLLM_NIXL_SIDE_CHANNEL_HOST
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: VLLM_NIXL_SIDE_CHANNEL_PORT
          value: {{ $v.pd.sideChannelPort | quote }}
        {{- end }}
        {{- include "llmd.otelEnv" (dict "root" $root "component" .role) | nindent 8 }}
        {{- with $w.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: {{ ternary "decoder" "http" $pdDecode }}
          containerPort: {{ $servePort }}
          protocol: TCP
        {{- if $v.pd.enabled }}
        - name: kv
          containerPort: {{ $v.pd.sideChannelPort }}
          protocol: TCP
        {{- end }}
        {{- if $w.kvEvents.enabled }}
        - name: kv-events
          containerPort: {{ $w.kvEvents.port }}
          protocol: TCP
        - name: kv-replay
          containerPort: {{ $w.kvEvents.replayPort }}
          protocol: TCP
        {{- end }}
      startupProbe:
        httpGet:
          path: /health
          port: {{ ternary "decoder" "http" $pdDecode }}
        periodSeconds: 10
        failureThreshold: {{ div (add $w.startupTimeoutSeconds 9) 10 }}
      readinessProbe:
        httpGet:
          path: /health
          port: {{ ternary "decoder" "http" $pdDecode }}
        periodSeconds: 5
        failureThreshold: 2
      livenessProbe:
        httpGet:
          path: /health
          port: {{ ternary "decoder" "http" $pdDecode }}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 6
      lifecycle:
        preStop:
          sleep:
            seconds: {{ $w.preStopSleepSeconds }}
      {{- $res := deepCopy ($r.resources | default dict) }}
      {{- if eq $v.accelerator.type "nvidia" }}
      {{- $lim := deepCopy (get $res "limits" | default dict) }}
      {{- $_ := set $lim "nvidia.com/gpu" $v.accelerator.count }}
      {{- $_ := set $res "limits" $lim }}
      {{- end }}
      resources:
        {{- toYaml $res | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - name: model-cache
          mountPath: {{ $v.model.cache.mountPath }}
        - name: tmp
          mountPath: /tmp
        {{- include "llmd.secretMount" $root | nindent 8 }}
        {{- if $v.kvDisk.enabled }}
        - name: kv-disk
          mountPath: {{ $v.kvDisk.mountPath }}
        {{- end }}
        {{- if and (include "llmd.redisUrl" $root) $v.redis.passwordSecret.name }}
        - name: redis-password
          mountPath: /etc/llmd/redis
          readOnly: true
        {{- end }}
  volumes:
    {{- include "llmd.modelVolume" $root | nindent 4 }}
    - name: tmp
      emptyDir: {}
    {{- include "llmd.secretVolume" $root | nindent 4 }}
    {{- if $v.kvDisk.enabled }}
    {{- $d := $v.kvDisk }}
    - name: kv-disk
      {{- if eq $d.type "hostPath" }}
      hostPath:
        path: {{ $d.hostPath }}
        type: DirectoryOrCreate
      {{- else if eq $d.type "pvc" }}
      persistentVolumeClaim:
        claimName: {{ required "kvDisk.claimName is required with kvDisk.type pvc" $d.claimName }}
      {{- else }}
      emptyDir:
        {{- with $d.medium }}
        medium: {{ . }}
        {{- end }}
        sizeLimit: {{ printf "%vGi" $d.sizeGb }}
      {{- end }}
    {{- end }}
    {{- if and (include "llmd.redisUrl" $root) $v.redis.passwordSecret.name }}
    - name: redis-password
      secret:
        secretName: {{ $v.redis.passwordSecret.name }}
        defaultMode: 0440
    {{- end }}
{{- end }}
