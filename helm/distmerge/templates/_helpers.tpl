{{/*
Names and KubeRay's limits on them (ray-project/kuberay, ray-operator/controllers/ray/utils):
  - a RayJob's name is at most MaxRayJobNameLength = 47 characters and a DNS-1035 label
    (lower case letters, digits, '-', starting with a letter) (validation.go,
    ValidateRayJobMetadata), because the RayCluster it creates is named `<rayjob>-<5 random>`
    (GenerateRayClusterName) and a RayCluster's name is at most MaxRayClusterNameLength = 53
    (63 - len("-serve-svc")) (constant.go);
  - worker pods are named `<cluster>-<group>` cut to 50 characters, then "-worker-" and 5
    random characters (PodName in util.go). A prefix over 50 characters is cut silently, which
    can drop the group's name: so the RayJob's name is also kept within
    50 - 6 - 1 - len(groupName) = 43 - len(groupName) characters, and `kubectl get pods` shows
    `<rayjob>-xxxxx-<group>-worker-yyyyy` whole.
A name cut short ends with '-' and 5 characters of the sha256 of the whole name, so that two
long release names sharing a prefix do not collide.
*/}}

{{- define "distmerge.nameLimit" -}}
{{- $group := .Values.workers.groupName | default "gpu" -}}
{{- min 47 (sub 43 (len $group)) -}}
{{- end -}}

{{- define "distmerge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The RayJob's name, and the stem of every other name of the release. */}}
{{- define "distmerge.fullname" -}}
{{- $full := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $full = .Values.fullnameOverride -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- $full = .Release.Name -}}
{{- else -}}
{{- $full = printf "%s-%s" .Release.Name $name -}}
{{- end -}}
{{- end -}}
{{- $full = regexReplaceAll "[^a-z0-9-]" (lower $full) "-" -}}
{{- if not (regexMatch "^[a-z]" $full) -}}
{{- $full = printf "dm-%s" $full -}}
{{- end -}}
{{- $limit := int (include "distmerge.nameLimit" .) -}}
{{- if gt (len $full) $limit -}}
{{- $hash := sha256sum $full | trunc 5 -}}
{{- $full = printf "%s-%s" (regexReplaceAll "-+$" ($full | trunc (int (sub $limit 6))) "") $hash -}}
{{- end -}}
{{- regexReplaceAll "-+$" $full "" -}}
{{- end -}}

{{- define "distmerge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "distmerge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "distmerge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "distmerge.labels" -}}
helm.sh/chart: {{ include "distmerge.chart" . }}
{{ include "distmerge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: distmerge
{{- end -}}

{{- define "distmerge.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* A value as a string; whole numbers without an exponent (YAML numbers reach templates as
floats: 200000000000 would print as 2e+11). */}}
{{- define "distmerge.str" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- printf "%d" (int64 .) -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{- define "distmerge.pipelinePath" -}}/etc/distmerge/pipeline.yaml{{- end -}}

{{/*
The pipeline as a dict: `pipeline` when not empty, else `pipelineYaml` parsed; then
ray.address = auto (the RayJob's own cluster) and, when absent, resources.workers and
resources.gpus_per_worker from the worker group, and metrics.linger_seconds (the driver keeps
its metrics endpoint up after the run until Prometheus scraped the final values). Refuses, with
a message naming the key, a pipeline that could not work in a RayJob: no pipeline, a missing
top-level key, a local output path that the pods do not share, another Ray address, more GPUs
than the worker group has.
*/}}
{{- define "distmerge.pipelineDict" -}}
{{- $p := dict -}}
{{- if .Values.pipeline -}}
{{- $p = deepCopy .Values.pipeline -}}
{{- else if .Values.pipelineYaml -}}
{{- $p = fromYaml .Values.pipelineYaml -}}
{{- if hasKey $p "Error" -}}
{{- fail (printf "pipelineYaml: not a YAML mapping: %v" (get $p "Error")) -}}
{{- end -}}
{{- else -}}
{{- fail "no pipeline: set `pipeline` (a mapping) or `pipelineYaml` (e.g. --set-file pipelineYaml=my-merge.yaml)" -}}
{{- end -}}
{{- range $key := list "base" "experts" "method" "output" -}}
{{- if not (hasKey $p $key) -}}
{{- fail (printf "the pipeline has no `%s` (required by distmerge's pipeline schema)" $key) -}}
{{- end -}}
{{- end -}}
{{- range $key := list "output" "resources" "ray" "metrics" -}}
{{- if and (hasKey $p $key) (get $p $key) (not (kindIs "map" (get $p $key))) -}}
{{- fail (printf "the pipeline's `%s` must be a mapping" $key) -}}
{{- end -}}
{{- end -}}
{{- $out := get (get $p "output" | default dict) "path" | default "" | toString -}}
{{- $local := trimPrefix "file://" $out -}}
{{- if not (contains "://" $local) -}}
{{- $mount := printf "%s/" (trimSuffix "/" .Values.cache.mountPath) -}}
{{- if or (ne .Values.cache.type "existingClaim") (not (hasPrefix $mount $local)) -}}
{{- fail (printf "output.path %s is a local path: every pod of the RayJob writes into it and a retry resumes from the staging folder beside it, so it must be on storage they share: an object store URL (s3://, gs://, hf://), or a path under cache.mountPath (%s) with cache.type existingClaim (a ReadWriteMany claim)" $out $mount) -}}
{{- end -}}
{{- end -}}
{{- $ray := get $p "ray" | default dict -}}
{{- if and (get $ray "address") (ne (toString (get $ray "address")) "auto") -}}
{{- fail (printf "pipeline ray.address is %v: inside a RayJob the merge runs on the job's own cluster; leave ray.address out (the chart sets auto)" (get $ray "address")) -}}
{{- end -}}
{{- $_ := set $p "ray" (dict "address" "auto") -}}
{{- $res := get $p "resources" | default dict -}}
{{- $gpus := .Values.workers.gpus | float64 -}}
{{- $replicas := .Values.workers.replicas | int -}}
{{- if gt $gpus 0.0 -}}
{{- if not (hasKey $res "gpus_per_worker") -}}
{{- $_ := set $res "gpus_per_worker" 1 -}}
{{- end -}}
{{- $per := get $res "gpus_per_worker" | float64 -}}
{{- if not (hasKey $res "workers") -}}
{{- if le $per 0.0 -}}
{{- $_ := set $res "workers" $replicas -}}
{{- else -}}
{{- $_ := set $res "workers" (max 1 (floor (divf (mulf $gpus $replicas) $per) | int)) -}}
{{- end -}}
{{- end -}}
{{- $need := mulf (get $res "workers" | float64) $per -}}
{{- $have := mulf $gpus $replicas -}}
{{- if gt $need $have -}}
{{- fail (printf "pipeline resources: %v workers x %v gpus_per_worker = %v GPUs, but the worker group has %v (workers.replicas %v x workers.gpus %v): the job would wait for GPUs forever" (get $res "workers") $per $need $have $replicas $gpus) -}}
{{- end -}}
{{- else -}}
{{- if gt (get $res "gpus_per_worker" | default 0 | float64) 0.0 -}}
{{- fail "pipeline resources.gpus_per_worker > 0 but workers.gpus is 0: give the worker group GPUs" -}}
{{- end -}}
{{- if not (hasKey $res "workers") -}}
{{- $_ := set $res "workers" $replicas -}}
{{- end -}}
{{- end -}}
{{- $_ := set $p "resources" $res -}}
{{- if .Values.metrics.enabled -}}
{{- $m := get $p "metrics" | default dict -}}
{{- if not (hasKey $m "linger_seconds") -}}
{{- $_ := set $m "linger_seconds" (.Values.metrics.lingerSeconds | int) -}}
{{- end -}}
{{- $_ := set $p "metrics" $m -}}
{{- end -}}
{{- toYaml $p -}}
{{- end -}}

{{/* The names of the S3 credential variables: the pipeline's key_env/secret_env/token_env. */}}
{{- define "distmerge.s3EnvNames" -}}
{{- $p := include "distmerge.pipelineDict" . | fromYaml -}}
{{- $s3 := dict -}}
{{- with (get $p "storage") -}}{{- with (get . "s3") -}}{{- $s3 = . -}}{{- end -}}{{- end -}}
key: {{ get $s3 "key_env" | default "AWS_ACCESS_KEY_ID" }}
secret: {{ get $s3 "secret_env" | default "AWS_SECRET_ACCESS_KEY" }}
token: {{ get $s3 "token_env" | default "AWS_SESSION_TOKEN" }}
pipelineKey: {{ get $s3 "key_env" | default "" | quote }}
pipelineToken: {{ get $s3 "token_env" | default "" | quote }}
{{- end -}}

{{/* Environment of every Ray container (head and workers). */}}
{{- define "distmerge.env" -}}
{{- $names := include "distmerge.s3EnvNames" . | fromYaml -}}
{{- $extra := list -}}
{{- range .Values.extraEnv }}{{ $extra = append $extra .name }}{{ end -}}
{{- $s3 := .Values.credentials.s3 -}}
{{- if and $names.pipelineKey (not $s3.secretName) (not (has $names.pipelineKey $extra)) -}}
{{- fail (printf "the pipeline reads S3 keys from $%s (storage.s3.key_env) but credentials.s3.secretName is empty and extraEnv does not set it" $names.pipelineKey) -}}
{{- end -}}
{{- if and $names.pipelineToken $s3.secretName (not $s3.sessionTokenKey) (not (has $names.pipelineToken $extra)) -}}
{{- fail (printf "the pipeline reads an S3 session token from $%s (storage.s3.token_env): set credentials.s3.sessionTokenKey" $names.pipelineToken) -}}
{{- end -}}
- name: PYTHONUNBUFFERED
  value: "1"
- name: DISTMERGE_CACHE
  value: {{ .Values.cache.mountPath | quote }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.cache.mountPath | quote }}
{{- with $s3.secretName }}
- name: {{ $names.key }}
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $s3.accessKeyIdKey | quote }}}
- name: {{ $names.secret }}
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $s3.secretAccessKeyKey | quote }}}
{{- if $s3.sessionTokenKey }}
- name: {{ $names.token }}
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $s3.sessionTokenKey | quote }}}
{{- end }}
{{- end }}
{{- with .Values.credentials.gcs.secretName }}
- name: GOOGLE_APPLICATION_CREDENTIALS
  value: {{ printf "/var/run/secrets/distmerge/gcs/%s" $.Values.credentials.gcs.key | quote }}
{{- end }}
{{- with .Values.credentials.hub.secretName }}
- name: {{ $.Values.credentials.hub.env }}
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.credentials.hub.key | quote }}}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "distmerge.volumeMounts" -}}
- name: pipeline
  mountPath: /etc/distmerge
  readOnly: true
- name: cache
  mountPath: {{ .Values.cache.mountPath | quote }}
  {{- with .Values.cache.subPath }}
  subPath: {{ . | quote }}
  {{- end }}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.credentials.gcs.secretName }}
- name: gcs-credentials
  mountPath: /var/run/secrets/distmerge/gcs
  readOnly: true
{{- end }}
{{- end -}}

{{- define "distmerge.volumes" -}}
- name: pipeline
  configMap:
    name: {{ include "distmerge.fullname" . }}-pipeline
    items:
      - {key: pipeline.yaml, path: pipeline.yaml}
- name: cache
  {{- if eq .Values.cache.type "existingClaim" }}
  {{- if not .Values.cache.existingClaim }}
  {{- fail "cache.type is existingClaim: set cache.existingClaim to the PersistentVolumeClaim's name" }}
  {{- end }}
  persistentVolumeClaim:
    claimName: {{ .Values.cache.existingClaim | quote }}
  {{- else }}
  emptyDir:
    {{- with .Values.cache.sizeLimit }}
    sizeLimit: {{ . | quote }}
    {{- else }} {}
    {{- end }}
  {{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .Values.shmSizeLimit }}
    sizeLimit: {{ . | quote }}
    {{- end }}
{{- with .Values.credentials.gcs.secretName }}
- name: gcs-credentials
  secret:
    secretName: {{ . | quote }}
    items:
      - {key: {{ $.Values.credentials.gcs.key | quote }}, path: {{ $.Values.credentials.gcs.key | quote }}}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by head and workers. */}}
{{- define "distmerge.podCommon" -}}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . | quote }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
volumes:
  {{- include "distmerge.volumes" . | nindent 2 }}
{{- end -}}

{{- define "distmerge.entrypoint" -}}
{{- $args := list "distmerge" "run" (include "distmerge.pipelinePath" .) "--resume" -}}
{{- if .Values.metrics.enabled -}}
{{- $args = concat $args (list "--metrics-port" (toString (int .Values.metrics.port))) -}}
{{- end -}}
{{- range .Values.job.extraArgs -}}
{{- $args = append $args (include "distmerge.str" .) -}}
{{- end -}}
{{- $quoted := list -}}
{{- range $args -}}
{{- if regexMatch "^[A-Za-z0-9_./:=@%+,-]+$" . -}}
{{- $quoted = append $quoted . -}}
{{- else -}}
{{- $quoted = append $quoted (squote (replace "'" "'\"'\"'" .)) -}}
{{- end -}}
{{- end -}}
{{- join " " $quoted -}}
{{- end -}}
