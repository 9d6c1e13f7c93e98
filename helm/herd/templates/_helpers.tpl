{{/* ---------------------------------------------------------------------------------------------------
Names and labels
--------------------------------------------------------------------------------------------------- */}}

{{- define "herd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The RayService name and the prefix of every object. KubeRay derives pod and Service names from it
(<name>-raycluster-xxxxx-head, <name>-head-svc, <name>-serve-svc), so it is kept to 40 characters. */}}
{{- define "herd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "herd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "herd.labels" -}}
helm.sh/chart: {{ include "herd.chart" . }}
app.kubernetes.io/name: {{ include "herd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herd
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The label that selects this release's Ray pods. KubeRay owns app.kubernetes.io/name on its pods
(it sets "kuberay"), so the chart selects by a label of its own. */}}
{{- define "herd.podSelectorLabels" -}}
herd.dev/instance: {{ include "herd.fullname" . }}
{{- end -}}

{{/* Labels of every Ray pod (KubeRay adds ray.io/cluster, ray.io/node-type, ray.io/group, ray.io/serve). */}}
{{- define "herd.podLabels" -}}
{{ include "herd.podSelectorLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: herd
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "herd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "herd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the API keys: apiKeys.existingSecret, else the one the chart generates (apiKeys.generate,
unless config.allow_unauthenticated says no keys are meant), else "" (no API keys). */}}
{{- define "herd.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if include "herd.generateApiKeys" . -}}
{{- printf "%s-api-keys" (include "herd.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "herd.generateApiKeys" -}}
{{- if and (not .Values.apiKeys.existingSecret) .Values.apiKeys.generate (not .Values.config.allow_unauthenticated) -}}
true
{{- end -}}
{{- end -}}

{{- define "herd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------------------
The herd cluster config (ClusterConfig) and the Serve config (serveConfigV2)
--------------------------------------------------------------------------------------------------- */}}

{{/* Where a model's files are inside the Ray containers: its `path` (absolute as is, relative under
weights.mountPath), else <weights.mountPath>/<name>. Argument: (list $model $root). */}}
{{- define "herd.modelPath" -}}
{{- $m := index . 0 -}}{{- $root := index . 1 -}}
{{- $mount := trimSuffix "/" $root.Values.weights.mountPath -}}
{{- if $m.path -}}
{{- if hasPrefix "/" $m.path -}}{{- $m.path -}}{{- else -}}{{- printf "%s/%s" $mount $m.path -}}{{- end -}}
{{- else -}}
{{- printf "%s/%s" $mount $m.name -}}
{{- end -}}
{{- end -}}

{{/* A shard's resources when a model does not say: one GPU if any worker group has GPUs, else one CPU. */}}
{{- define "herd.defaultShardResources" -}}
{{- $gpus := 0.0 -}}
{{- range $g := .Values.workerGroups -}}{{- $gpus = addf $gpus (default 0 $g.gpus | float64) -}}{{- end -}}
{{- if gt $gpus 0.0 -}}GPU: 1{{- else -}}CPU: 1{{- end -}}
{{- end -}}

{{/* The `args` of the Serve application: the ClusterConfig that `herd serve CONFIG.yaml` reads. Null values
are dropped (ClusterConfig's defaults apply) and chart-only keys (models[].source) removed. */}}
{{- define "herd.clusterConfig" -}}
{{- $root := . -}}
{{- $cfg := dict "host" "0.0.0.0" -}}
{{- range $k, $v := .Values.config -}}
{{- if not (kindIs "invalid" $v) -}}{{- $_ := set $cfg $k $v -}}{{- end -}}
{{- end -}}
{{- if include "herd.apiKeysSecret" . -}}
{{- $_ := set $cfg "api_keys_file" (printf "%s/%s" (trimSuffix "/" .Values.apiKeys.mountPath) .Values.apiKeys.key) -}}
{{- end -}}
{{- if .Values.tls.existingSecret -}}
{{- $dir := trimSuffix "/" .Values.tls.mountPath -}}
{{- $_ := set $cfg "tls" (dict "cert_file" (printf "%s/tls.crt" $dir) "key_file" (printf "%s/tls.key" $dir)) -}}
{{- end -}}
{{- $models := list -}}
{{- range $m := .Values.models -}}
{{- $out := dict -}}
{{- range $k, $v := $m -}}
{{- if and (ne $k "source") (not (kindIs "invalid" $v)) -}}{{- $_ := set $out $k $v -}}{{- end -}}
{{- end -}}
{{- $_ := set $out "path" (include "herd.modelPath" (list $m $root)) -}}
{{- if not (hasKey $out "resources_per_shard") -}}
{{- /* Always explicit: ClusterConfig's own default depends on the host that parses it (the head, no GPU). */ -}}
{{- $_ := set $out "resources_per_shard" (include "herd.defaultShardResources" $root | fromYaml) -}}
{{- end -}}
{{- $models = append $models $out -}}
{{- end -}}
{{- $_ := set $cfg "models" $models -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* serveConfigV2: Serve-wide proxy options, as cluster.app's serve_start_options builds them for `herd serve`
(the gRPC servicers cluster.app registers, GRPC_SERVICER_FUNCTIONS; reflection only when the config asks for it;
the config's finite request timeout on both proxies), and the applications: the ingress's first (the whole
config, serve.applicationName), then one per model, named <applicationName>-model-<name>
(cluster.app_name.model_application), holding its own entry and the cluster keys it is built from
(cluster.app.MODEL_APPLICATION_CLUSTER_KEYS), but not its Serve options (cluster.app.MODEL_SERVE_OPTIONS): those
are the application's `deployments` override, autoscaling_config completed as cluster.app completes it. The
servicer lists, both key lists and those defaults are files/serve-defaults.json, generated from cluster.app
(`make schema`). Serve versions every deployment of a declarative application by a hash of its args
(not of the override): so a change restarts the models whose args it touches, and the ingress; a change of a
model's Serve options restarts nothing (cluster.app.build_model_app). */}}
{{- define "herd.serveConfig" -}}
{{- $c := .Values.config -}}
{{- $timeout := 600 -}}
{{- if not (kindIs "invalid" $c.request_timeout_s) -}}{{- $timeout = $c.request_timeout_s -}}{{- end -}}
{{- $http := dict "host" "0.0.0.0" "port" (default 8000 $c.http_port) "request_timeout_s" $timeout -}}
{{- $generated := .Files.Get "files/serve-defaults.json" | fromJson -}}
{{- $servicers := $generated.grpc_servicer_functions -}}
{{- if eq $c.enable_reflection true -}}{{- $servicers = concat $servicers $generated.reflection_servicer_functions -}}{{- end -}}
{{- $grpc := dict "port" (default 9000 $c.grpc_port) "grpc_servicer_functions" $servicers "enable_reflection" (eq $c.enable_reflection true) "request_timeout_s" $timeout -}}
{{- if .Values.tls.existingSecret -}}
{{- $dir := trimSuffix "/" .Values.tls.mountPath -}}
{{- $_ := set $http "ssl_certfile" (printf "%s/tls.crt" $dir) -}}
{{- $_ := set $http "ssl_keyfile" (printf "%s/tls.key" $dir) -}}
{{- end -}}
{{- $cfg := include "herd.clusterConfig" . | fromYaml -}}
{{- $name := .Values.serve.applicationName -}}
{{- $apps := list (dict "name" $name "route_prefix" .Values.serve.routePrefix "import_path" "cluster.app:build_ingress_app" "args" $cfg) -}}
{{- range $m := $cfg.models -}}
{{- $entry := deepCopy $m -}}
{{- range $k := $generated.model_serve_options -}}{{- $_ := unset $entry $k -}}{{- end -}}
{{- $args := dict "models" (list $entry) -}}
{{- range $k := $generated.model_application_cluster_keys -}}{{- if hasKey $cfg $k -}}{{- $_ := set $args $k (get $cfg $k) -}}{{- end -}}{{- end -}}
{{- $serve := dict "name" (printf "model-%s" $m.name) -}}
{{- if $m.autoscaling_config -}}
{{- $autoscaling := deepCopy $generated.autoscaling_config -}}
{{- range $k, $v := $m.autoscaling_config -}}{{- if not (kindIs "invalid" $v) -}}{{- $_ := set $autoscaling $k $v -}}{{- end -}}{{- end -}}
{{- $_ := set $serve "autoscaling_config" $autoscaling -}}
{{- $_ := set $serve "num_replicas" nil -}}
{{- else -}}
{{- $_ := set $serve "num_replicas" (default 1 $m.num_replicas) -}}
{{- $_ := set $serve "autoscaling_config" nil -}}
{{- end -}}
{{- range $k := without $generated.model_serve_options "num_replicas" "autoscaling_config" -}}
{{- if hasKey $m $k -}}{{- $_ := set $serve $k (get $m $k) -}}{{- end -}}
{{- end -}}
{{- $apps = append $apps (dict "name" (printf "%s-model-%s" $name $m.name) "route_prefix" nil "import_path" "cluster.app:build_model_app" "args" $args "deployments" (list $serve)) -}}
{{- end -}}
{{- toYaml (dict "proxy_location" .Values.serve.proxyLocation "http_options" $http "grpc_options" $grpc "applications" $apps) -}}
{{- end -}}

{{/* `ray start` parameters: defaults overlaid by the user's, every value a string (KubeRay requires it). */}}
{{- define "herd.rayStartParams" -}}
{{- $params := dict -}}
{{- range $k, $v := . -}}
{{- if kindIs "float64" $v -}}
{{- if eq (floor $v) $v -}}{{- $_ := set $params $k (printf "%d" (int64 $v)) -}}{{- else -}}{{- $_ := set $params $k (toString $v) -}}{{- end -}}
{{- else -}}
{{- $_ := set $params $k (toString $v) -}}
{{- end -}}
{{- end -}}
{{- if $params -}}{{- toYaml $params -}}{{- else -}}{}{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------------------
Pod pieces shared by the head and the workers
--------------------------------------------------------------------------------------------------- */}}

{{- define "herd.podSpecCommon" -}}
serviceAccountName: {{ include "herd.serviceAccountName" . }}
terminationGracePeriodSeconds: {{ include "herd.terminationGracePeriod" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* Volume mounts of Secrets every Ray container needs (build_app reads api_keys_file, possibly on the head). */}}
{{- define "herd.secretMounts" -}}
{{- if include "herd.apiKeysSecret" . }}
- name: api-keys
  mountPath: {{ .Values.apiKeys.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.tls.existingSecret }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Mode 0440: owner root, group fsGroup (podSecurityContext) — readable by the container's user, by nobody else. */}}
{{- define "herd.secretVolumes" -}}
{{- if include "herd.apiKeysSecret" . }}
- name: api-keys
  secret:
    secretName: {{ include "herd.apiKeysSecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.apiKeys.key }}
        path: {{ .Values.apiKeys.key }}
{{- end }}
{{- if .Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* The head's own Ray ports. KubeRay's head Service carries every port of the head container, so Ray Client is
listed only when service.client.enabled asks for it (GCS and dashboard are needed: workers join the GCS and the
operator talks to the dashboard through that Service). */}}
{{- define "herd.headPorts" -}}
- name: gcs-server
  containerPort: 6379
  protocol: TCP
- name: dashboard
  containerPort: 8265
  protocol: TCP
{{- if .Values.service.client.enabled }}
- name: client
  containerPort: 10001
  protocol: TCP
{{- end }}
{{- end -}}

{{/* Environment of every Ray container: Serve's proxies read RAY_SERVE_GRPC_MAX_MESSAGE_SIZE (send and receive
limit of the gRPC proxy), HERD_HTTP_MAX_CONNECTIONS / HERD_HTTP_MAX_HEADER_BYTES (limits.max_http_connections / max_http_header_bytes), HERD_GRPC_MAX_CONNECTIONS / HERD_GRPC_CONNECTION_IDLE_S
(with RAY_preload_python_modules, which applies them to the gRPC proxy) and RAY_SERVE_PROXY_USE_GRPC (config.serve_transport: the proxy calls the ingress over
Serve's gRPC transport) in the proxy process; then the user's `env`. */}}
{{- define "herd.rayEnv" -}}
{{- $limits := default (dict) .Values.config.limits -}}
- name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
  value: {{ int64 (default 8388608 $limits.max_grpc_message_bytes) | quote }}
- name: HERD_HTTP_MAX_CONNECTIONS   # the HTTP proxy's connection cap (cluster.proxy_http_connections)
  value: {{ int64 (default 10000 $limits.max_http_connections) | quote }}
- name: HERD_HTTP_MAX_HEADER_BYTES   # the HTTP proxy's bound on a request head (431 over it)
  value: {{ int64 (default 65536 $limits.max_http_header_bytes) | quote }}
- name: HERD_GRPC_MAX_CONNECTIONS   # the gRPC proxy's connection cap and idle timeout (cluster.grpc_proxy_connections)
  value: {{ int64 (default 10000 $limits.max_grpc_connections) | quote }}
- name: HERD_GRPC_CONNECTION_IDLE_S
  value: {{ default 300.0 $limits.grpc_connection_idle_s | toString | quote }}
- name: RAY_preload_python_modules   # the raylet has every worker import it first: it applies the two above
  value: cluster.grpc_proxy_preload
- name: RAY_SERVE_PROXY_USE_GRPC
  value: {{ eq (default "grpc" .Values.config.serve_transport) "grpc" | ternary "1" "0" | quote }}
- name: HERD_SERVE_APPLICATION   # where Serve's proxies send calls to herd's services that name no application
  value: {{ .Values.serve.applicationName | quote }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The longest graceful_shutdown_timeout_s of the models (ClusterConfig's 60 s where a model does not say),
in whole seconds. */}}
{{- define "herd.maxGracefulShutdown" -}}
{{- $max := 0.0 -}}
{{- range $m := .Values.models -}}
{{- $g := 60.0 -}}
{{- if not (kindIs "invalid" $m.graceful_shutdown_timeout_s) -}}{{- $g = float64 $m.graceful_shutdown_timeout_s -}}{{- end -}}
{{- $max = maxf $max $g -}}
{{- end -}}
{{- int64 (ceil $max) -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: as given, else the preStop delay + the longest drain + a margin. */}}
{{- define "herd.terminationGracePeriod" -}}
{{- $gs := .Values.gracefulShutdown -}}
{{- if not (kindIs "invalid" $gs.terminationGracePeriodSeconds) -}}
{{- int64 $gs.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add (int64 $gs.preStopDelaySeconds) (include "herd.maxGracefulShutdown" . | int64) (int64 $gs.marginSeconds) -}}
{{- end -}}
{{- end -}}

{{/* The container ports of a Ray pod that serve traffic and metrics. */}}
{{- define "herd.servePorts" -}}
- name: serve
  containerPort: {{ int (default 8000 .Values.config.http_port) }}
  protocol: TCP
- name: grpc
  containerPort: {{ int (default 9000 .Values.config.grpc_port) }}
  protocol: TCP
- name: metrics
  containerPort: {{ int .Values.monitoring.metricsPort }}
  protocol: TCP
{{- end -}}

{{/* preStop: wait while the endpoints controller takes the pod out of the Services (requests already on it go
on), then `ray stop`, which gives Ray's processes the longest graceful_shutdown_timeout_s before it kills them. */}}
{{- define "herd.preStop" -}}
lifecycle:
  preStop:
    exec:
      command: ["/bin/sh", "-c", {{ printf "sleep %d; ray stop --grace-period %s" (int64 .Values.gracefulShutdown.preStopDelaySeconds) (include "herd.maxGracefulShutdown" .) | quote }}]
{{- end -}}

{{/* The weights volume of the worker pods. */}}
{{- define "herd.weightsVolume" -}}
{{- $w := .Values.weights -}}
{{- if eq $w.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "herd.weightsClaim" . }}
    readOnly: true
{{- else if eq $w.source "hostPath" }}
- name: models
  hostPath:
    path: {{ $w.hostPath.path }}
    type: {{ $w.hostPath.type }}
{{- else if eq $w.source "download" }}
{{- if $w.download.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ $w.download.existingClaim }}
{{- else }}
- name: models
  emptyDir:
    sizeLimit: {{ $w.download.sizeLimit }}
{{- end }}
{{- else if eq $w.source "demo" }}
- name: models
  emptyDir:
    sizeLimit: {{ $w.demo.sizeLimit }}
{{- end }}
{{- end -}}

{{- define "herd.weightsClaim" -}}
{{- if .Values.weights.pvc.create -}}
{{- printf "%s-models" (include "herd.fullname" .) -}}
{{- else -}}
{{- .Values.weights.pvc.existingClaim -}}
{{- end -}}
{{- end -}}

{{- define "herd.weightsMount" -}}
{{- $w := .Values.weights -}}
{{- if ne $w.source "image" }}
- name: models
  mountPath: {{ $w.mountPath }}
  {{- if has $w.source (list "pvc" "hostPath") }}
  readOnly: true
  {{- end }}
  {{- if and (eq $w.source "pvc") $w.pvc.subPath }}
  subPath: {{ $w.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Init containers that put the weights in place before Ray starts on a worker pod. Both skip a model that
is already complete (a marker file), so a shared download PVC is filled once. */}}
{{- define "herd.weightsInitContainers" -}}
{{- $root := . -}}
{{- $w := .Values.weights -}}
{{- if eq $w.source "download" }}
- name: download-weights
  image: {{ default (include "herd.image" .) $w.download.image }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["/bin/bash", "-ec"]
  args:
    - |
      fetch() {  # fetch KIND SOURCE REVISION DEST
        if [ -f "$4/.herd-complete" ]; then echo "herd: $4 already present"; return 0; fi
        mkdir -p "$4"
        case "$1" in
          s3) echo "herd: aws s3 sync $2 -> $4"; aws s3 sync --only-show-errors "$2" "$4" ;;
          hf) echo "herd: hf download $2@$3 -> $4"; hf download "$2" --revision "$3" --local-dir "$4" ;;
        esac
        touch "$4/.herd-complete"
      }
      {{- range $m := .Values.models }}
      {{- $dest := include "herd.modelPath" (list $m $root) }}
      {{- if $m.source.s3 }}
      fetch s3 {{ $m.source.s3 | squote }} "" {{ $dest | squote }}
      {{- else }}
      fetch hf {{ $m.source.huggingface | squote }} {{ default "main" $m.source.revision | squote }} {{ $dest | squote }}
      {{- end }}
      {{- end }}
  env:
    - name: HF_HUB_DISABLE_PROGRESS_BARS
      value: "1"
    {{- with $w.download.env }}
{{ toYaml . | indent 4 }}
    {{- end }}
  {{- if $w.download.credentialsSecret }}
  envFrom:
    - secretRef:
        name: {{ $w.download.credentialsSecret }}
  {{- end }}
  {{- with $w.download.resources }}
  resources:
{{ toYaml . | indent 4 }}
  {{- end }}
  {{- with .Values.containerSecurityContext }}
  securityContext:
{{ toYaml . | indent 4 }}
  {{- end }}
  volumeMounts:
    - name: models
      mountPath: {{ $w.mountPath }}
{{- else if eq $w.source "demo" }}
- name: demo-checkpoints
  image: {{ include "herd.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["/bin/bash", "-ec"]
  args:
    - |
      {{- range $m := .Values.models }}
      {{- $dest := include "herd.modelPath" (list $m $root) }}
      if [ -f {{ printf "%s/config.json" $dest | squote }} ]; then echo "herd: {{ $dest }} already present"; else
        herd demo-checkpoint {{ $dest | squote }} --shape {{ $m.source.demo | squote }}
      fi
      {{- end }}
  {{- with .Values.containerSecurityContext }}
  securityContext:
{{ toYaml . | indent 4 }}
  {{- end }}
  volumeMounts:
    - name: models
      mountPath: {{ $w.mountPath }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------------------
Template-time checks: fail early, with the value's path, instead of a RayService that never becomes ready.
--------------------------------------------------------------------------------------------------- */}}

{{/* Stop rendering with `msg`. `helm lint` (Helm 4) only logs a template's fail and carries on, so in that
mode the message also becomes the name of an object no Kubernetes API accepts, which `helm lint --strict`
reports (and fails on) with the message in it. */}}
{{- define "herd.fail" -}}
{{- fail . -}}
{{- printf "\n---\napiVersion: v1\nkind: HerdValuesCheckFailed\nmetadata:\n  name: %s\n---\n" (quote .) -}}
{{- end -}}

{{- define "herd.checks" -}}
{{- $root := . -}}
{{- $v := .Values -}}
{{- /* worker groups */ -}}
{{- $groupNames := list -}}
{{- range $i, $g := $v.workerGroups -}}
{{- if has $g.name $groupNames -}}
{{- include "herd.fail" (printf "workerGroups[%d].name: %q is used by two worker groups; group names must be unique" $i $g.name) -}}
{{- end -}}
{{- $groupNames = append $groupNames $g.name -}}
{{- if and (not (kindIs "invalid" $g.idleTimeoutSeconds)) (or (not $v.autoscaling.enabled) (ne $v.autoscaling.version "v2")) -}}
{{- include "herd.fail" (printf "workerGroups[%d] (%s): idleTimeoutSeconds needs the Ray autoscaler v2 (autoscaling.enabled: true, autoscaling.version: v2); KubeRay rejects it otherwise" $i $g.name) -}}
{{- end -}}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) -}}
{{- include "herd.fail" (printf "workerGroups[%d] (%s): minReplicas (%d) must be <= maxReplicas (%d)" $i $g.name (int $g.minReplicas) (int $g.maxReplicas)) -}}
{{- end -}}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) -}}
{{- include "herd.fail" (printf "workerGroups[%d] (%s): replicas (%d) must lie between minReplicas (%d) and maxReplicas (%d)" $i $g.name (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- /* models: names, replica settings, weights source */ -}}
{{- $names := list -}}
{{- range $i, $m := $v.models -}}
{{- if has $m.name $names -}}
{{- include "herd.fail" (printf "models[%d].name: %q is used by two models; model names must be unique" $i $m.name) -}}
{{- end -}}
{{- $names = append $names $m.name -}}
{{- if and (not (kindIs "invalid" $m.num_replicas)) (not (kindIs "invalid" $m.autoscaling_config)) -}}
{{- include "herd.fail" (printf "models[%d] (%s): set num_replicas or autoscaling_config, not both" $i $m.name) -}}
{{- end -}}
{{- $src := default dict $m.source -}}
{{- if eq $v.weights.source "download" -}}
{{- if and (not $src.huggingface) (not $src.s3) -}}
{{- include "herd.fail" (printf "models[%d] (%s): weights.source is download, so the model needs source.huggingface (org/repo) or source.s3 (s3://bucket/prefix/)" $i $m.name) -}}
{{- end -}}
{{- if and $src.huggingface $src.s3 -}}
{{- include "herd.fail" (printf "models[%d] (%s): give source.huggingface or source.s3, not both" $i $m.name) -}}
{{- end -}}
{{- else if eq $v.weights.source "demo" -}}
{{- if not $src.demo -}}
{{- include "herd.fail" (printf "models[%d] (%s): weights.source is demo, so the model needs source.demo (llama2-70b-mini, llama3-8b-mini or llama32-1b-mini)" $i $m.name) -}}
{{- end -}}
{{- else if eq $v.weights.source "image" -}}
{{- if not (hasPrefix "/" (default "" $m.path)) -}}
{{- include "herd.fail" (printf "models[%d] (%s): weights.source is image, so the model needs an absolute path inside the image" $i $m.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.weights.source "pvc") (not $v.weights.pvc.existingClaim) (not $v.weights.pvc.create) -}}
{{- include "herd.fail" "weights.pvc.existingClaim: weights.source is pvc, so name an existing ReadOnlyMany PVC (or set weights.pvc.create)" -}}
{{- end -}}
{{- /* no literal credentials in environment lists */ -}}
{{- range $where, $envs := dict "env" $v.env "weights.download.env" $v.weights.download.env -}}
{{- range $e := $envs -}}
{{- if and (hasKey $e "value") (regexMatch "(?i)(secret|token|password|passwd|credential|access_key|api_key)" $e.name) -}}
{{- include "herd.fail" (printf "%s: %s looks like a credential given as a literal value; put it in a Secret (weights.download.credentialsSecret, or valueFrom.secretKeyRef)" $where $e.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.rayService.upgradeStrategy "Incremental") (not $v.rayService.clusterUpgradeOptions.gatewayClassName) -}}
{{- include "herd.fail" "rayService.clusterUpgradeOptions: the Incremental upgrade strategy needs gatewayClassName, stepSizePercent and intervalSeconds" -}}
{{- end -}}
{{- /* ClusterConfig's cross-field rules, with the values' paths (JSON schema cannot say them) */ -}}
{{- $c := $v.config -}}
{{- if eq (int $c.grpc_port) (int $c.http_port) -}}
{{- include "herd.fail" (printf "config: grpc_port and http_port must differ (both %d)" (int $c.grpc_port)) -}}
{{- end -}}
{{- if and (kindIs "map" $c.ingress_autoscaling) (ne (int (default 1 $c.ingress_replicas)) 1) -}}
{{- include "herd.fail" "config: set ingress_replicas or ingress_autoscaling, not both" -}}
{{- end -}}
{{- $scalers := list -}}
{{- if kindIs "map" $c.ingress_autoscaling -}}{{- $scalers = append $scalers (list "config.ingress_autoscaling" $c.ingress_autoscaling) -}}{{- end -}}
{{- range $i, $m := $v.models -}}
{{- if kindIs "map" $m.autoscaling_config -}}{{- $scalers = append $scalers (list (printf "models[%d] (%s).autoscaling_config" $i $m.name) $m.autoscaling_config) -}}{{- end -}}
{{- end -}}
{{- range $s := $scalers -}}
{{- $a := index $s 1 -}}
{{- $min := 1 -}}{{- if not (kindIs "invalid" $a.min_replicas) -}}{{- $min = int $a.min_replicas -}}{{- end -}}
{{- $max := 1 -}}{{- if not (kindIs "invalid" $a.max_replicas) -}}{{- $max = int $a.max_replicas -}}{{- end -}}
{{- if lt $max $min -}}
{{- include "herd.fail" (printf "%s: max_replicas (%d) must be >= min_replicas (%d)" (index $s 0) $max $min) -}}
{{- end -}}
{{- end -}}
{{- $lim := default (dict) $c.limits -}}
{{- if and (not (kindIs "invalid" $lim.min_repetition_penalty)) (not (kindIs "invalid" $lim.max_repetition_penalty)) -}}
{{- if lt (float64 $lim.max_repetition_penalty) (float64 $lim.min_repetition_penalty) -}}
{{- include "herd.fail" "config.limits: max_repetition_penalty must be >= min_repetition_penalty" -}}
{{- end -}}
{{- end -}}
{{- $keys := include "herd.apiKeysSecret" . -}}
{{- if and (not $keys) (not $c.allow_unauthenticated) -}}
{{- include "herd.fail" "apiKeys: the Serve proxies listen on every interface and no API keys are set; name a Secret in apiKeys.existingSecret, keep apiKeys.generate: true, or set config.allow_unauthenticated: true if serving without keys is meant" -}}
{{- end -}}
{{- if and (eq (toString $c.prefix_cache_isolation) "per_key") (not $keys) -}}
{{- include "herd.fail" "config.prefix_cache_isolation: per_key needs API keys (apiKeys.existingSecret or apiKeys.generate)" -}}
{{- end -}}
{{- /* the grace period must cover the preStop delay and the drain */ -}}
{{- $gs := $v.gracefulShutdown -}}
{{- if not (kindIs "invalid" $gs.terminationGracePeriodSeconds) -}}
{{- $need := add (int64 $gs.preStopDelaySeconds) (include "herd.maxGracefulShutdown" . | int64) -}}
{{- if lt (int64 $gs.terminationGracePeriodSeconds) $need -}}
{{- include "herd.fail" (printf "gracefulShutdown.terminationGracePeriodSeconds (%d) is shorter than preStopDelaySeconds + the longest models[].graceful_shutdown_timeout_s (%d): the kubelet would kill the pods mid-drain" (int64 $gs.terminationGracePeriodSeconds) $need) -}}
{{- end -}}
{{- end -}}
{{- include "herd.checkGpus" . -}}
{{- end -}}

{{/* Every model's GPUs at its largest size (TP x PP x GPU per shard x replicas, max_replicas when autoscaled,
plus the replicas a rolling update surges)
must fit what the worker groups provide at theirs (gpus x maxReplicas with the Ray autoscaler, else x replicas). */}}
{{- define "herd.checkGpus" -}}
{{- $v := .Values -}}
{{- $provided := 0.0 -}}
{{- $largestPod := 0.0 -}}
{{- $pods := 0 -}}
{{- $groups := list -}}
{{- range $g := $v.workerGroups -}}
{{- $n := ternary $g.maxReplicas $g.replicas $v.autoscaling.enabled | int -}}
{{- $gpus := default 0 $g.gpus | float64 -}}
{{- $provided = addf $provided (mulf $gpus $n) -}}
{{- $largestPod = maxf $largestPod $gpus -}}
{{- $pods = add $pods $n -}}
{{- $groups = append $groups (printf "%s: %d pod(s) x %v GPU" $g.name $n $gpus) -}}
{{- end -}}
{{- $needed := 0.0 -}}
{{- $asks := list -}}
{{- range $i, $m := $v.models -}}
{{- $tp := default 1 $m.tensor_parallel_size | int -}}
{{- $pp := default 1 $m.pipeline_parallel_size | int -}}
{{- $shards := mul $tp $pp -}}
{{- $res := default (include "herd.defaultShardResources" $ | fromYaml) $m.resources_per_shard -}}
{{- $gpuPerShard := default 0 (get $res "GPU") | float64 -}}
{{- $replicas := 1 -}}
{{- if $m.autoscaling_config -}}
{{- $replicas = default 1 $m.autoscaling_config.max_replicas | int -}}
{{- else if not (kindIs "invalid" $m.num_replicas) -}}
{{- $replicas = int $m.num_replicas -}}
{{- end -}}
{{- $perReplica := mulf $shards $gpuPerShard -}}
{{- if gt $perReplica 0.0 -}}
{{- if and (eq (default "PACK" $m.placement_strategy) "STRICT_PACK") (gt $perReplica $largestPod) -}}
{{- include "herd.fail" (printf "models[%d] (%s): placement_strategy STRICT_PACK puts all TP x PP = %d x %d shards (%v GPUs) on one node, but the largest worker pod has %v GPUs; use PACK to span pods, or a larger node type" $i $m.name $tp $pp $perReplica $largestPod) -}}
{{- end -}}
{{- /* A rolling update with max_surge_percent starts that share of replicas (rounded up) before it stops old
ones: without room for them the update waits forever. */ -}}
{{- $surge := div (add (mul (default 0 $m.max_surge_percent | int) $replicas) 99) 100 -}}
{{- $need := mulf $perReplica (add $replicas $surge) -}}
{{- $needed = addf $needed $need -}}
{{- $surgeText := ternary (printf " + %d surging in a rolling update (max_surge_percent)" $surge) "" (gt $surge 0) -}}
{{- $asks = append $asks (printf "%s: TP x PP = %d x %d shards x %v GPU x %d replica(s)%s = %v" $m.name $tp $pp $gpuPerShard $replicas $surgeText $need) -}}
{{- end -}}
{{- if and (eq (default "PACK" $m.placement_strategy) "STRICT_SPREAD") (gt (add $shards 1) $pods) -}}
{{- include "herd.fail" (printf "models[%d] (%s): placement_strategy STRICT_SPREAD needs %d worker pods (one per shard plus the replica's driver), but the worker groups have %d" $i $m.name (add $shards 1) $pods) -}}
{{- end -}}
{{- end -}}
{{- if gt $needed $provided -}}
{{- include "herd.fail" (printf "models need %v GPUs at their largest size (%s), but the worker groups provide %v (%s); add GPUs or pods to workerGroups, or lower tensor_parallel_size x pipeline_parallel_size, replicas or max_surge_percent" $needed (join "; " $asks) $provided (join "; " $groups)) -}}
{{- end -}}
{{- end -}}
