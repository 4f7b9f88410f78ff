{{/* specdec.name: the chart name, or nameOverride. */}}
{{- define "specdec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* specdec.fullname: release-qualified prefix of every object name. */}}
{{- define "specdec.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "specdec.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "specdec.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* specdec.labels: standard labels for objects of component $component. */}}
{{- define "specdec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{ include "specdec.selectorLabels" . }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* specdec.selectorLabels: the immutable subset of labels, for selectors. */}}
{{- define "specdec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specdec.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* specdec.serviceImage: the services image reference (all tiers). */}}
{{- define "specdec.serviceImage" -}}
{{- printf "%s/%s:%s" .Values.image.registry .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* specdec.operatorImage: the operator image reference. */}}
{{- define "specdec.operatorImage" -}}
{{- $i := .Values.operator.image -}}
{{- printf "%s/%s:%s" $i.registry $i.repository (default .Chart.AppVersion $i.tag) -}}
{{- end -}}

{{/* specdec.serviceAccountName: the operator's ServiceAccount. */}}
{{- define "specdec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "specdec.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* specdec.redisHost: the bundled Redis Service name. */}}
{{- define "specdec.redisHost" -}}
{{- printf "%s-redis" (include "specdec.fullname" .) -}}
{{- end -}}

{{/* specdec.redisPort: the bundled Valkey's port: 6380 (TLS only) or 6379. */}}
{{- define "specdec.redisPort" -}}
{{- ternary 6380 6379 .Values.redis.tls.enabled -}}
{{- end -}}

{{/* specdec.redisCaFile: where every pod finds the CA of a rediss:// server (SPECDEC_REDIS_CA). */}}
{{- define "specdec.redisCaFile" -}}
/etc/specdec/redis-ca/ca.crt
{{- end -}}

{{/* specdec.bundledRedisUrl: a bundled Valkey's client URL, with the password (dict ctx, password; host:
     the Service, default the state Valkey's). */}}
{{- define "specdec.bundledRedisUrl" -}}
{{- $ctx := .ctx -}}
{{- $auth := ternary (printf ":%s@" .password) "" (ne .password "") -}}
{{- $service := .host | default (include "specdec.redisHost" $ctx) -}}
{{- $host := printf "%s.%s.svc:%s" $service $ctx.Release.Namespace (include "specdec.redisPort" $ctx) -}}
{{- if $ctx.Values.redis.tls.enabled -}}
{{- printf "rediss://%s%s/0" $auth $host -}}
{{- else -}}
{{- printf "redis://%s%s/0" $auth $host -}}
{{- end -}}
{{- end -}}

{{/* specdec.redisUrl: plain Redis URL, empty when it comes from a Secret. */}}
{{- define "specdec.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- if not .Values.redis.auth.enabled -}}
{{- include "specdec.bundledRedisUrl" (dict "ctx" . "password" "") -}}
{{- end -}}
{{- else if not .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* specdec.redisAuthSecret: the Secret with the bundled Valkey's password and client URL. */}}
{{- define "specdec.redisAuthSecret" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis-auth" (include "specdec.fullname" .)) -}}
{{- end -}}

{{/* specdec.redisUrlRef: JSON {name, key} of the Secret key holding the clients' Redis URL; {} when the URL is plain. */}}
{{- define "specdec.redisUrlRef" -}}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled -}}
{{- dict "name" (include "specdec.redisAuthSecret" .) "key" "url" | toJson -}}
{{- else if and (not .Values.redis.enabled) .Values.redis.external.existingSecret -}}
{{- dict "name" .Values.redis.external.existingSecret "key" .Values.redis.external.existingSecretKey | toJson -}}
{{- else -}}
{{- dict | toJson -}}
{{- end -}}
{{- end -}}

{{/* specdec.kvRedisEnabled: "true" when the release runs the KV chunks' own Valkey (beside the bundled state one). */}}
{{- define "specdec.kvRedisEnabled" -}}
{{- if and .Values.redis.enabled .Values.kvRedis.enabled -}}true{{- end -}}
{{- end -}}

{{/* specdec.kvRedisHost: the KV chunks' Valkey Service name. */}}
{{- define "specdec.kvRedisHost" -}}
{{- printf "%s-kv-redis" (include "specdec.fullname" .) -}}
{{- end -}}

{{/* specdec.kvRedisAuthSecret: the Secret with the KV Valkey's password and client URL. */}}
{{- define "specdec.kvRedisAuthSecret" -}}
{{- .Values.kvRedis.auth.existingSecret | default (printf "%s-kv-redis-auth" (include "specdec.fullname" .)) -}}
{{- end -}}

{{/* specdec.kvRedisUrlRef: JSON {name, key} of the Secret key holding the KV chunks' URL; {} when there is
     none (the chunks share the state server) or it is plain (specdec.kvRedisUrl). */}}
{{- define "specdec.kvRedisUrlRef" -}}
{{- if and (include "specdec.kvRedisEnabled" .) .Values.redis.auth.enabled -}}
{{- dict "name" (include "specdec.kvRedisAuthSecret" .) "key" "url" | toJson -}}
{{- else if and (not .Values.redis.enabled) .Values.kvRedis.external.existingSecret -}}
{{- dict "name" .Values.kvRedis.external.existingSecret "key" .Values.kvRedis.external.existingSecretKey | toJson -}}
{{- else -}}
{{- dict | toJson -}}
{{- end -}}
{{- end -}}

{{/* specdec.kvRedisUrl: the KV chunks' plain URL (bundled without auth); empty otherwise. */}}
{{- define "specdec.kvRedisUrl" -}}
{{- if and (include "specdec.kvRedisEnabled" .) (not .Values.redis.auth.enabled) -}}
{{- include "specdec.bundledRedisUrl" (dict "ctx" . "password" "" "host" (include "specdec.kvRedisHost" .)) -}}
{{- end -}}
{{- end -}}

{{/* specdec.redisMaxmemory / specdec.redisPolicy: the state Valkey's cap and policy. With the KV chunks on
     their own Valkey it holds records only: a small cap and noeviction (a full server refuses writes, it
     never drops a record); sharing one with the chunks, the KV-sized cap and allkeys-lru. */}}
{{- define "specdec.redisMaxmemory" -}}
{{- .Values.redis.maxmemory | default (ternary "1gb" "6gb" (eq (include "specdec.kvRedisEnabled" .) "true")) -}}
{{- end -}}
{{- define "specdec.redisPolicy" -}}
{{- .Values.redis.maxmemoryPolicy | default (ternary "noeviction" "allkeys-lru" (eq (include "specdec.kvRedisEnabled" .) "true")) -}}
{{- end -}}

{{/* specdec.redisTlsSecret: the bundled Valkey's certificate Secret (existing or cert-manager's). */}}
{{- define "specdec.redisTlsSecret" -}}
{{- .Values.redis.tls.existingSecret | default (printf "%s-redis-tls" (include "specdec.fullname" .)) -}}
{{- end -}}

{{/* specdec.redisCaRef: JSON {name, key} of the CA a rediss:// client trusts; {} without Redis TLS. */}}
{{- define "specdec.redisCaRef" -}}
{{- if and .Values.redis.enabled .Values.redis.tls.enabled -}}
{{- dict "name" (include "specdec.redisTlsSecret" .) "key" "ca.crt" | toJson -}}
{{- else if and (not .Values.redis.enabled) .Values.redis.external.caSecret.name -}}
{{- toJson .Values.redis.external.caSecret -}}
{{- else -}}
{{- dict | toJson -}}
{{- end -}}
{{- end -}}

{{/* specdec.secretValue: a value of a Secret the chart generates: the live one (so upgrades keep it), else random (dict ctx, name, key). */}}
{{- define "specdec.secretValue" -}}
{{- $live := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- if and $live $live.data (hasKey $live.data .key) -}}
{{- index $live.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 40 -}}
{{- end -}}
{{- end -}}

{{/* specdec.coordinatorTlsSecret: the coordinator's certificate Secret. */}}
{{- define "specdec.coordinatorTlsSecret" -}}
{{- if .Values.tls.certManager.enabled -}}
{{- printf "%s-coordinator-tls" (include "specdec.fullname" .) -}}
{{- else -}}
{{- .Values.tls.coordinatorSecret | default .Values.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* specdec.tierTlsSecret: the draft and target tiers' certificate Secret. */}}
{{- define "specdec.tierTlsSecret" -}}
{{- if .Values.tls.certManager.enabled -}}
{{- printf "%s-tier-tls" (include "specdec.fullname" .) -}}
{{- else -}}
{{- .Values.tls.tierSecret | default .Values.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* specdec.apiKeysSecret: the Secret with the API keys' digests (existing or generated). */}}
{{- define "specdec.apiKeysSecret" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "specdec.fullname" .)) -}}
{{- end -}}

{{/* specdec.internalSecret: the Secret with the internal token and the KV MAC key (existing or generated). */}}
{{- define "specdec.internalSecret" -}}
{{- .Values.internalSecrets.existingSecret | default (printf "%s-internal" (include "specdec.fullname" .)) -}}
{{- end -}}

{{/* specdec.redisCaVolume: the redis-ca volume of a pod, when clients need a CA for rediss://. */}}
{{- define "specdec.redisCaVolume" -}}
{{- with (include "specdec.redisCaRef" . | fromJson) }}
- name: redis-ca
  secret:
    secretName: {{ .name }}
    defaultMode: 0440
    items:
      - key: {{ .key }}
        path: ca.crt
{{- end }}
{{- end -}}

{{/* specdec.podSecurityContext: non-root pod security context; UIDs left to the platform with openshift. */}}
{{- define "specdec.podSecurityContext" -}}
runAsNonRoot: true
{{- if not .Values.openshift }}
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* specdec.tierPort: gRPC port of a tier of the chart's decoder (values, else the default). */}}
{{- define "specdec.tierPort" -}}
{{- $t := index .ctx.Values.decoder .tier | default dict -}}
{{- $t.port | default (get (dict "coordinator" 50051 "draft" 50052 "target" 50053) .tier) -}}
{{- end -}}

{{/* specdec.namespacePeers: NetworkPolicy peers for pods of these namespaces (by name). */}}
{{- define "specdec.namespacePeers" -}}
{{- range . }}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ . }}
{{- end }}
{{- end -}}

{{/* specdec.secretNames: Secrets the operator may read: operator.secretNames plus the one holding the Redis URL. */}}
{{- define "specdec.secretNames" -}}
{{- $names := .Values.operator.secretNames | default list -}}
{{- with (include "specdec.redisUrlRef" . | fromJson) -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- toJson ($names | uniq) -}}
{{- end -}}

{{/* specdec.containerSecurityContext: read-only, no privileges, no capabilities. */}}
{{- define "specdec.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* specdec.validateValues: every problem with the values, reported at once. */}}
{{- define "specdec.validateValues" -}}
{{- $errors := list -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) -}}
{{- $errors = append $errors "redis: set redis.enabled=true, redis.external.url or redis.external.existingSecret" -}}
{{- end -}}
{{- if and .Values.redis.enabled (or .Values.redis.external.url .Values.redis.external.existingSecret) -}}
{{- $errors = append $errors "redis: redis.external.* is ignored while redis.enabled=true; disable one" -}}
{{- end -}}
{{- if and .Values.redis.enabled .Values.kvRedis.external.existingSecret -}}
{{- $errors = append $errors "kvRedis.external.existingSecret names the KV server beside an external Redis: with redis.enabled use kvRedis.enabled" -}}
{{- end -}}
{{- if and .Values.decoder.enabled (eq .Values.decoder.drafter.type "model") (not .Values.decoder.drafter.model) -}}
{{- $errors = append $errors "decoder.drafter.model is required when decoder.drafter.type=model" -}}
{{- end -}}
{{- range $tier := list "coordinator" "draft" "target" -}}
{{- $t := index $.Values.decoder $tier | default dict -}}
{{- if and (hasKey $t "minReplicas") (hasKey $t "maxReplicas") (gt (int $t.minReplicas) (int $t.maxReplicas)) -}}
{{- $errors = append $errors (printf "decoder.%s: minReplicas > maxReplicas" $tier) -}}
{{- end -}}
{{- end -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.peering.enabled) -}}
{{- $errors = append $errors "operator.replicas > 1 needs operator.peering.enabled=true (else the pods fight)" -}}
{{- end -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not (kindIs "invalid" .Values.operator.peering.priority)) -}}
{{- $errors = append $errors "operator.peering.priority gives every operator pod one priority, and kopf pauses them all: leave it null with replicas > 1 (each pod's priority then comes from its name)" -}}
{{- end -}}
{{- range $tier := list "coordinator" "draft" "target" -}}
{{- $t := index $.Values.decoder $tier | default dict -}}
{{- if gt (int ((($t.gpu | default dict).count) | default 0)) 1 -}}
{{- $errors = append $errors (printf "decoder.%s.gpu.count > 1 is refused: a replica loads its model on one device (no sharding across a pod's GPUs yet); use gpu.count 1 and more replicas" $tier) -}}
{{- end -}}
{{- end -}}
{{- with .Values.decoder.modelCache -}}
{{- if eq (empty .claimName) (empty .size) -}}
{{- $errors = append $errors "decoder.modelCache: set claimName (an existing PVC) or size (a new one), one of them" -}}
{{- end -}}
{{- end -}}
{{- $tls := .Values.tls -}}
{{- if and $tls.enabled (not $tls.certManager.enabled) (not (and (include "specdec.coordinatorTlsSecret" .) (include "specdec.tierTlsSecret" .))) -}}
{{- $errors = append $errors "tls.enabled: set tls.certManager.enabled (with an issuerRef), tls.existingSecret, or both tls.coordinatorSecret and tls.tierSecret" -}}
{{- end -}}
{{- if and $tls.certManager.enabled (or $tls.existingSecret $tls.coordinatorSecret $tls.tierSecret) -}}
{{- $errors = append $errors "tls: certificates come from cert-manager (tls.certManager.enabled) or from existing Secrets, not both" -}}
{{- end -}}
{{- if and (or ($tls.enabled) (and .Values.redis.enabled .Values.redis.tls.enabled (not .Values.redis.tls.existingSecret))) $tls.certManager.enabled (not $tls.certManager.issuerRef.name) -}}
{{- $errors = append $errors "tls.certManager.issuerRef.name is required: the Issuer or ClusterIssuer that signs the certificates" -}}
{{- end -}}
{{- if and .Values.redis.enabled .Values.redis.tls.enabled (not .Values.redis.tls.existingSecret) (not $tls.certManager.enabled) -}}
{{- $errors = append $errors "redis.tls.enabled: set redis.tls.existingSecret or tls.certManager.enabled (a Certificate for Valkey)" -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) (or .Values.redis.tls.enabled .Values.redis.auth.existingSecret) -}}
{{- $errors = append $errors "redis.tls and redis.auth are the bundled Valkey's: with an external Redis put the password in the URL (redis.external.existingSecret) and its CA in redis.external.caSecret" -}}
{{- end -}}
{{- if and .Values.decoder.enabled .Values.decoder.http.enabled (has (int .Values.decoder.http.port) (list (int (include "specdec.tierPort" (dict "ctx" . "tier" "coordinator"))) (int .Values.metrics.port))) -}}
{{- $errors = append $errors "decoder.http.port is also the coordinator's gRPC or the metrics port" -}}
{{- end -}}
{{- if and (or .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled) (not .Values.metrics.enabled) -}}
{{- $errors = append $errors "metrics.serviceMonitor/podMonitor need metrics.enabled=true" -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n\nVALUES VALIDATION:\n  %s" (join "\n  " $errors)) -}}
{{- end -}}
{{- end -}}

{{/* specdec.operatorRules: least-privilege rules for reconciling SpeculativeDecoders. */}}
{{- define "specdec.operatorRules" -}}
- apiGroups: [specdec.io]
  resources: [speculativedecoders]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [specdec.io]
  resources: [speculativedecoders/status]
  verbs: [get, patch]
# blockOwnerDeletion on the tiers' owner references (OpenShift's admission checks it).
- apiGroups: [specdec.io]
  resources: [speculativedecoders/finalizers]
  verbs: [update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, create, patch, delete]
# Pods: read only, to say why a tier is not ready (unschedulable, cannot start).
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch, delete]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- if .Values.operator.peering.enabled }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [list, watch, patch, get]
{{- end }}
{{- with (include "specdec.secretNames" . | fromJsonArray) }}
- apiGroups: [""]
  resources: [secrets]
  resourceNames: {{ toYaml . | nindent 4 }}
  verbs: [get]
{{- end }}
{{- end -}}
