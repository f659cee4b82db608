{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "itemstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "itemstream.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's name: <fullname>-<component>, still within 63 characters. */}}
{{- define "itemstream.componentName" -}}
{{- printf "%s-%s" (include "itemstream.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{- define "itemstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: selector labels never change across upgrades (selectors are immutable). */}}
{{- define "itemstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "itemstream.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "itemstream.labels" -}}
helm.sh/chart: {{ include "itemstream.chart" .root }}
{{ include "itemstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: itemstream
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "itemstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "itemstream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* image: registry/repository:tag or @digest; global.imageRegistry wins. */}}
{{- define "itemstream.image" -}}
{{- $registry := .image.registry -}}
{{- if and .global .global.imageRegistry -}}{{- $registry = .global.imageRegistry -}}{{- end -}}
{{- $ref := printf "%s:%s" .image.repository (toString (default .default .image.tag)) -}}
{{- if .image.digest -}}{{- $ref = printf "%s@%s" .image.repository .image.digest -}}{{- end -}}
{{- if $registry -}}{{- printf "%s/%s" $registry $ref -}}{{- else -}}{{- $ref -}}{{- end -}}
{{- end -}}

{{- define "itemstream.appImage" -}}
{{- include "itemstream.image" (dict "image" .Values.image "global" .Values.global "default" .Chart.AppVersion) -}}
{{- end -}}

{{- define "itemstream.imagePullSecrets" -}}
{{- $secrets := concat (default list .Values.global.imagePullSecrets) (default list .Values.imagePullSecrets) -}}
{{- if $secrets }}
imagePullSecrets:
{{- range $secrets }}
  - name: {{ if kindIs "string" . }}{{ . }}{{ else }}{{ .name }}{{ end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Database --------------------------------------------------------------------------- */}}

{{- define "itemstream.postgresql.fullname" -}}
{{- include "itemstream.componentName" (dict "root" . "component" "postgresql") -}}
{{- end -}}

{{- define "itemstream.pgbouncer.fullname" -}}
{{- include "itemstream.componentName" (dict "root" . "component" "pgbouncer") -}}
{{- end -}}

{{/* Where Postgres itself is: the direct endpoint (migrations, PgBouncer's server side). */}}
{{- define "itemstream.db.host" -}}
{{- if .Values.postgresql.enabled -}}
{{- include "itemstream.postgresql.fullname" . -}}
{{- else if and .Values.externalDatabase.hosts (not .Values.externalDatabase.host) -}}
{{- if .Values.pgbouncer.enabled -}}
{{- fail "externalDatabase.hosts: the chart's PgBouncer connects to one host and cannot tell which one is the primary; name one endpoint that follows the primary in externalDatabase.host (the operator's read-write Service, or HAProxy with Patroni's health check), or set pgbouncer.enabled=false" -}}
{{- end -}}
{{- first .Values.externalDatabase.hosts -}}
{{- else -}}
{{- required "externalDatabase.host (or externalDatabase.hosts) is required when postgresql.enabled is false" .Values.externalDatabase.host -}}
{{- end -}}
{{- end -}}

{{- define "itemstream.db.port" -}}
{{- if .Values.postgresql.enabled -}}5432{{- else -}}{{- .Values.externalDatabase.port -}}{{- end -}}
{{- end -}}

{{- define "itemstream.db.name" -}}
{{- if .Values.postgresql.enabled -}}{{- .Values.postgresql.auth.database -}}{{- else -}}{{- .Values.externalDatabase.database -}}{{- end -}}
{{- end -}}

{{- define "itemstream.db.user" -}}
{{- if .Values.postgresql.enabled -}}{{- .Values.postgresql.auth.username -}}{{- else -}}{{- .Values.externalDatabase.user -}}{{- end -}}
{{- end -}}

{{- define "itemstream.db.sslmode" -}}
{{- if .Values.postgresql.enabled -}}disable{{- else -}}{{- .Values.externalDatabase.sslmode -}}{{- end -}}
{{- end -}}

{{/* The user's existing Secret for the database password, if any (bundled or external). */}}
{{- define "itemstream.db.existingSecret" -}}
{{- ternary .Values.postgresql.auth.existingSecret .Values.externalDatabase.existingSecret .Values.postgresql.enabled -}}
{{- end -}}

{{/* The Secret and key that hold the database password. */}}
{{- define "itemstream.db.secretName" -}}
{{- default (include "itemstream.fullname" .) (include "itemstream.db.existingSecret" .) -}}
{{- end -}}

{{- define "itemstream.db.secretKey" -}}
{{- if include "itemstream.db.existingSecret" . -}}
{{- ternary .Values.postgresql.auth.existingSecretPasswordKey .Values.externalDatabase.existingSecretPasswordKey .Values.postgresql.enabled -}}
{{- else -}}database-password{{- end -}}
{{- end -}}

{{/* The key that signs cursors, when the chart's Secret holds it: the value, the one already
     in the cluster (upgrades keep it: cursors clients hold stay valid), or a new random one;
     cached in .Values so every template of one render agrees. */}}
{{- define "itemstream.cursorSecret" -}}
{{- if not (hasKey .Values "_cursorSecret") -}}
{{- $key := .Values.security.cursorSecret -}}
{{- if not $key -}}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "itemstream.fullname" .) -}}
{{- if and $secret $secret.data (hasKey $secret.data "cursor-secret") -}}
{{- $key = index $secret.data "cursor-secret" | b64dec -}}
{{- else -}}
{{- $key = randAlphaNum 48 -}}
{{- end -}}
{{- end -}}
{{- $_ := set .Values "_cursorSecret" $key -}}
{{- end -}}
{{- .Values._cursorSecret -}}
{{- end -}}

{{- define "itemstream.db.ownSecret" -}}
{{- if not (include "itemstream.db.existingSecret" .) -}}true{{- end -}}
{{- end -}}

{{/* The password the chart's own Secret stores: the value, the one already in the cluster
     (so upgrades keep it), or a new random one. Cached in .Values so that every template of
     one render (the hook Secret and the regular one) agrees. */}}
{{- define "itemstream.db.password" -}}
{{- if not (hasKey .Values "_generated") -}}
{{- $given := ternary .Values.postgresql.auth.password .Values.externalDatabase.password .Values.postgresql.enabled -}}
{{- $password := $given -}}
{{- if not $password -}}
{{- if not .Values.postgresql.enabled -}}
{{- fail "externalDatabase.password or externalDatabase.existingSecret is required" -}}
{{- end -}}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "itemstream.fullname" .) -}}
{{- if and $secret $secret.data (hasKey $secret.data "database-password") -}}
{{- $password = index $secret.data "database-password" | b64dec -}}
{{- else -}}
{{- /* A reinstall after `helm uninstall` finds the bundled Postgres's volume (a StatefulSet's
       PVCs outlive it) initialised with the old password: never pair it with a new one. */ -}}
{{- $pvc := printf "data-%s-0" (include "itemstream.postgresql.fullname" .) -}}
{{- if lookup "v1" "PersistentVolumeClaim" .Release.Namespace $pvc -}}
{{- fail (printf "the bundled PostgreSQL's volume %s exists from an earlier install, but the Secret with its password is gone: set postgresql.auth.password to the password it was created with, or delete the PVC to start empty" $pvc) -}}
{{- end -}}
{{- $password = randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- $_ := set .Values "_generated" $password -}}
{{- end -}}
{{- .Values._generated -}}
{{- end -}}

{{/* What the app connects to: PgBouncer (in-chart or external) or Postgres directly. */}}
{{- define "itemstream.app.dbHost" -}}
{{- if .Values.pgbouncer.enabled -}}
{{- include "itemstream.pgbouncer.fullname" . -}}
{{- else if .Values.pgbouncer.external.host -}}
{{- .Values.pgbouncer.external.host -}}
{{- else -}}
{{- include "itemstream.db.host" . -}}
{{- end -}}
{{- end -}}

{{- define "itemstream.app.dbPort" -}}
{{- if .Values.pgbouncer.enabled -}}{{- .Values.pgbouncer.port -}}
{{- else if .Values.pgbouncer.external.host -}}{{- .Values.pgbouncer.external.port -}}
{{- else -}}{{- include "itemstream.db.port" . -}}{{- end -}}
{{- end -}}

{{- define "itemstream.app.pooler" -}}
{{- if or .Values.pgbouncer.enabled .Values.pgbouncer.external.host -}}{{- .Values.pgbouncer.appMode -}}{{- else -}}none{{- end -}}
{{- end -}}

{{/* URLs carry no password: it comes from DATABASE_PASSWORD (a secretKeyRef). */}}
{{- define "itemstream.app.databaseUrl" -}}
{{- $ssl := include "itemstream.db.sslmode" . -}}
{{- if .Values.pgbouncer.enabled -}}{{- $ssl = "disable" -}}{{- end -}}
{{- if or .Values.pgbouncer.enabled .Values.pgbouncer.external.host -}}
{{- printf "postgresql+asyncpg://%s@%s:%s/%s?ssl=%s" (include "itemstream.db.user" .) (include "itemstream.app.dbHost" .) (include "itemstream.app.dbPort" .) (include "itemstream.db.name" .) $ssl -}}
{{- else -}}
{{- include "itemstream.db.directUrl" . -}}
{{- end -}}
{{- end -}}

{{- define "itemstream.migrationDatabaseUrl" -}}
{{- include "itemstream.db.directUrl" . -}}
{{- end -}}

{{/* Straight to PostgreSQL: one host, or with externalDatabase.hosts each of them, the client
     keeping the one that accepts writes (target_session_attrs=read-write). */}}
{{- define "itemstream.db.directUrl" -}}
{{- if and (not .Values.postgresql.enabled) .Values.externalDatabase.hosts (not .Values.externalDatabase.host) -}}
{{- $port := include "itemstream.db.port" . -}}
{{- $hosts := list -}}
{{- range .Values.externalDatabase.hosts -}}{{- $hosts = append $hosts (printf "host=%s:%s" . $port) -}}{{- end -}}
{{- printf "postgresql+asyncpg://%s@/%s?%s&target_session_attrs=read-write&ssl=%s" (include "itemstream.db.user" .) (include "itemstream.db.name" .) (join "&" $hosts) (include "itemstream.db.sslmode" .) -}}
{{- else -}}
{{- printf "postgresql+asyncpg://%s@%s:%s/%s?ssl=%s" (include "itemstream.db.user" .) (include "itemstream.db.host" .) (include "itemstream.db.port" .) (include "itemstream.db.name" .) (include "itemstream.db.sslmode" .) -}}
{{- end -}}
{{- end -}}

{{/* gunicorn sizing -------------------------------------------------------------------- */}}

{{/* CPU quantity ("500m", "2", 1.5) -> whole CPUs, rounded up; 0 when absent. */}}
{{- define "itemstream.cpuCeil" -}}
{{- $q := toString . -}}
{{- if not . -}}0
{{- else if hasSuffix "m" $q -}}{{- div (add (trimSuffix "m" $q | int) 999) 1000 -}}
{{- else -}}{{- ceil (float64 $q) | int -}}
{{- end -}}
{{- end -}}

{{/* Workers per pod, by the app's own rule (app/workers.py): WEB_CONCURRENCY as given, else
     one per CPU of the limit rounded up, at most MAX_WORKERS; without a limit the app counts
     the node's CPUs, which the chart cannot know: MAX_WORKERS, the most it can be.
     tests/test_chart.py checks both sides against one table of CPU limits. */}}
{{- define "itemstream.workers" -}}
{{- if .Values.gunicorn.workers -}}{{- .Values.gunicorn.workers -}}
{{- else -}}
{{- $limit := include "itemstream.cpuCeil" (dig "limits" "cpu" "" (.Values.resources | default dict)) | int -}}
{{- $cap := int .Values.gunicorn.maxWorkers -}}
{{- if gt $limit 0 -}}{{- min $limit $cap -}}{{- else -}}{{- $cap -}}{{- end -}}
{{- end -}}
{{- end -}}

{{/* The rollout's surge: a quarter more pods, rounded up (so at least one). */}}
{{- define "itemstream.maxSurge" -}}25%{{- end -}}
{{- define "itemstream.surgePods" -}}
{{- $pods := include "itemstream.maxPods.steady" . | int -}}
{{- div (add $pods 3) 4 -}}
{{- end -}}

{{/* The most app pods at once: every replica the HPA may ask for, plus the rollout's surge
     (the old and the new ReplicaSet's pods overlap while a new release rolls out). */}}
{{- define "itemstream.maxPods.steady" -}}
{{- if .Values.autoscaling.enabled -}}{{- .Values.autoscaling.maxReplicas -}}{{- else -}}{{- .Values.replicaCount -}}{{- end -}}
{{- end -}}
{{- define "itemstream.maxPods" -}}
{{- add (include "itemstream.maxPods.steady" . | int) (include "itemstream.surgePods" . | int) -}}
{{- end -}}

{{/* Render-time guards ---------------------------------------------------------------- */}}
{{/* Shutdown timings. Each left empty follows from the others, so that by default a
     rollout or a scale-down lets every open stream end by its own limit (streams.maxSeconds);
     each one set bounds the ones derived from it. */}}
{{- define "itemstream.gracefulTimeout" -}}
{{- if not (kindIs "invalid" .Values.gunicorn.gracefulTimeout) -}}
{{- int .Values.gunicorn.gracefulTimeout -}}
{{- else -}}
{{- $drain := .Values.streams.maxSeconds -}}
{{- if not (kindIs "invalid" .Values.streams.drainSeconds) -}}{{- $drain = .Values.streams.drainSeconds -}}{{- end -}}
{{- $graceful := add (ceil $drain | int) 20 -}}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) -}}
{{- $graceful = min $graceful (sub (int .Values.terminationGracePeriodSeconds) (add (int .Values.preStopSleepSeconds) 5)) -}}
{{- end -}}
{{- $graceful -}}
{{- end -}}
{{- end -}}
{{- define "itemstream.streamDrainSeconds" -}}
{{- if not (kindIs "invalid" .Values.streams.drainSeconds) -}}
{{- .Values.streams.drainSeconds -}}
{{- else -}}
{{- min (ceil .Values.streams.maxSeconds | int) (sub (include "itemstream.gracefulTimeout" . | int) 5) | max 0 -}}
{{- end -}}
{{- end -}}
{{- define "itemstream.terminationGracePeriodSeconds" -}}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) -}}
{{- int .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add (int .Values.preStopSleepSeconds) (include "itemstream.gracefulTimeout" . | int) 5 -}}
{{- end -}}
{{- end -}}

{{- define "itemstream.validate" -}}
{{- $graceful := include "itemstream.gracefulTimeout" . | int -}}
{{- $grace := include "itemstream.terminationGracePeriodSeconds" . | int -}}
{{- $drain := include "itemstream.streamDrainSeconds" . | float64 -}}
{{- if lt $graceful 6 -}}
{{- fail (printf "gunicorn.gracefulTimeout (%d, from terminationGracePeriodSeconds - preStopSleepSeconds - 5 when empty) must be at least 6" $graceful) -}}
{{- end -}}
{{- $needed := add .Values.preStopSleepSeconds $graceful 5 | int -}}
{{- if lt $grace $needed -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds + gunicorn.gracefulTimeout + 5 = %d, or the kubelet kills pods mid-drain" $grace $needed) -}}
{{- end -}}
{{- if gt $drain (sub $graceful 5 | float64) -}}
{{- fail (printf "streams.drainSeconds (%v) must be at most gunicorn.gracefulTimeout - 5 (%d)" $drain (sub $graceful 5)) -}}
{{- end -}}
{{- if and (eq .Values.auth.mode "hs256") (eq .Values.environment "production") -}}
{{- fail "auth.mode=hs256 (a shared secret) is for development only; the app refuses it with environment=production" -}}
{{- end -}}
{{- if and (eq .Values.auth.mode "hs256") (not .Values.auth.hs256.existingSecret) -}}
{{- fail "auth.mode=hs256 needs auth.hs256.existingSecret" -}}
{{- end -}}
{{- if and (eq .Values.auth.mode "jwt") (not (and .Values.auth.issuer .Values.auth.audience)) -}}
{{- fail "auth.mode=jwt needs auth.issuer and auth.audience (a token minted for another service must not be accepted)" -}}
{{- end -}}
{{- if and (eq .Values.auth.mode "none") (eq .Values.environment "production") (not .Values.auth.allowUnauthenticated) -}}
{{- fail "auth.mode=none serves every caller with every scope, which the app refuses with environment=production: set auth.mode=jwt (with auth.issuer and auth.audience), or auth.allowUnauthenticated=true to try the chart out or behind a gateway that authenticates" -}}
{{- end -}}
{{- if and (eq .Values.llm.provider "openai") (not .Values.llm.baseUrl) -}}
{{- fail "llm.baseUrl is required when llm.provider is openai" -}}
{{- end -}}
{{- if and .Values.pgbouncer.enabled .Values.pgbouncer.external.host -}}
{{- fail "set either pgbouncer.enabled or pgbouncer.external.host, not both" -}}
{{- end -}}
{{- $pods := include "itemstream.maxPods" . | int -}}
{{- $workers := include "itemstream.workers" . | int -}}
{{- $perWorker := add .Values.config.dbPoolSize .Values.config.dbMaxOverflow | int -}}
{{- $appConns := mul $pods $workers $perWorker -}}
{{- $dbBudget := ternary (sub (int .Values.postgresql.maxConnections) 10) (int .Values.externalDatabase.maxConnections) .Values.postgresql.enabled | int -}}
{{- if .Values.pgbouncer.enabled -}}
{{- if gt $appConns (int .Values.pgbouncer.maxClientConn) -}}
{{- fail (printf "connection guard: up to %d app pods (with the rollout's surge) x %d workers x %d connections (dbPoolSize + dbMaxOverflow) = %d exceeds pgbouncer.maxClientConn (%d); lower autoscaling.maxReplicas, gunicorn.workers or config.dbPoolSize, or raise pgbouncer.maxClientConn" $pods $workers $perWorker $appConns (int .Values.pgbouncer.maxClientConn)) -}}
{{- end -}}
{{- $serverConns := mul (int .Values.pgbouncer.replicaCount) (add .Values.pgbouncer.defaultPoolSize .Values.pgbouncer.reservePoolSize) -}}
{{- if gt $serverConns $dbBudget -}}
{{- fail (printf "connection guard: %d PgBouncer pods x %d server connections (defaultPoolSize + reservePoolSize) = %d exceeds the database budget (%d); lower the pool sizes or raise externalDatabase.maxConnections" (int .Values.pgbouncer.replicaCount) (add .Values.pgbouncer.defaultPoolSize .Values.pgbouncer.reservePoolSize | int) $serverConns $dbBudget) -}}
{{- end -}}
{{- else if not .Values.pgbouncer.external.host -}}
{{- if gt $appConns $dbBudget -}}
{{- fail (printf "connection guard: up to %d app pods (with the rollout's surge) x %d workers x %d connections = %d exceeds the database budget (%d) without a pooler; enable pgbouncer or lower the sizes" $pods $workers $perWorker $appConns $dbBudget) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The most connections the app pods open to the pooler or database in front of them. */}}
{{- define "itemstream.appConnections" -}}
{{- mul (include "itemstream.maxPods" . | int) (include "itemstream.workers" . | int) (add .Values.config.dbPoolSize .Values.config.dbMaxOverflow | int) -}}
{{- end -}}

{{/* Environment shared by the app and the migration containers. */}}
{{- define "itemstream.dbEnv" -}}
- name: DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "itemstream.db.secretName" . }}
      key: {{ include "itemstream.db.secretKey" . }}
{{- include "itemstream.db.caEnv" . }}
{{- end -}}

{{/* The migration mode in effect: a pre-install hook cannot reach a bundled Postgres that
     Helm only creates after the hook, so with postgresql.enabled `hook` runs as a `job`. */}}
{{- define "itemstream.migrations.mode" -}}
{{- if and (eq .Values.migrations.mode "hook") .Values.postgresql.enabled -}}job{{- else -}}{{- .Values.migrations.mode -}}{{- end -}}
{{- end -}}

{{/* Non-secret settings of the app (also inlined into the hook Job, see migration-job.yaml). */}}
{{- define "itemstream.config" -}}
ENVIRONMENT: {{ .Values.environment | quote }}
LOG_LEVEL: {{ .Values.logLevel | quote }}
HOST: "0.0.0.0"
PORT: {{ .Values.containerPort | quote }}
DATABASE_URL: {{ include "itemstream.app.databaseUrl" . | quote }}
MIGRATION_DATABASE_URL: {{ include "itemstream.migrationDatabaseUrl" . | quote }}
DB_POOLER: {{ include "itemstream.app.pooler" . | quote }}
DB_POOL_SIZE: {{ .Values.config.dbPoolSize | quote }}
DB_MAX_OVERFLOW: {{ .Values.config.dbMaxOverflow | quote }}
DB_POOL_TIMEOUT: {{ .Values.config.dbPoolTimeout | quote }}
DB_REQUEST_TIMEOUT: {{ .Values.config.dbRequestTimeout | quote }}
DB_STATEMENT_TIMEOUT: {{ .Values.config.dbStatementTimeout | quote }}
DB_POOL_RECYCLE: {{ .Values.config.dbPoolRecycle | quote }}
READINESS_TIMEOUT: {{ include "itemstream.readinessTimeout" . | quote }}
MAX_BODY_BYTES: {{ .Values.config.maxBodyBytes | int64 | quote }}
REQUIRE_IF_MATCH: {{ .Values.config.requireIfMatch | quote }}
DOCS_ENABLED: {{ .Values.config.docsEnabled | quote }}
CORS_ALLOW_ORIGINS: {{ join "," .Values.config.corsAllowOrigins | quote }}
GUNICORN_TIMEOUT: {{ .Values.gunicorn.timeout | quote }}
GUNICORN_GRACEFUL_TIMEOUT: {{ include "itemstream.gracefulTimeout" . | quote }}
GUNICORN_KEEPALIVE: {{ .Values.gunicorn.keepalive | quote }}
GUNICORN_MAX_REQUESTS: {{ .Values.gunicorn.maxRequests | quote }}
MAX_WORKERS: {{ .Values.gunicorn.maxWorkers | quote }}
{{- with .Values.gunicorn.extraArgs }}
GUNICORN_CMD_ARGS: {{ . | quote }}
{{- end }}
METRICS_ENABLED: {{ .Values.metrics.enabled | quote }}
{{- if .Values.metrics.enabled }}
METRICS_PORT: {{ .Values.metrics.port | quote }}
PROMETHEUS_MULTIPROC_DIR: "/var/run/itemstream/metrics"
{{- end }}
LLM_PROVIDER: {{ .Values.llm.provider | quote }}
{{- with .Values.llm.baseUrl }}
LLM_BASE_URL: {{ . | quote }}
{{- end }}
LLM_MODEL: {{ .Values.llm.model | quote }}
{{- with .Values.llm.models }}
LLM_MODELS: {{ join "," . | quote }}
{{- end }}
LLM_READ_TIMEOUT: {{ .Values.llm.readTimeout | quote }}
STREAM_MAX_CONCURRENT: {{ .Values.streams.maxConcurrent | quote }}
STREAM_MAX_SECONDS: {{ .Values.streams.maxSeconds | quote }}
STREAM_HEARTBEAT_SECONDS: {{ .Values.streams.heartbeatSeconds | quote }}
STREAM_DRAIN_SECONDS: {{ include "itemstream.streamDrainSeconds" . | quote }}
AUTH_MODE: {{ .Values.auth.mode | quote }}
{{- with .Values.auth.issuer }}
AUTH_ISSUER: {{ . | quote }}
{{- end }}
{{- with .Values.auth.audience }}
AUTH_AUDIENCE: {{ . | quote }}
{{- end }}
{{- with .Values.auth.jwksUrl }}
AUTH_JWKS_URL: {{ . | quote }}
{{- end }}
AUTH_ANONYMOUS_READ: {{ .Values.auth.anonymousRead | quote }}
AUTH_TENANT_CLAIM: {{ .Values.auth.tenantClaim | quote }}
AUTH_ADMIN_SCOPE: {{ .Values.auth.adminScope | quote }}
{{- if .Values.auth.allowUnauthenticated }}
AUTH_ALLOW_UNAUTHENTICATED: "true"
{{- end }}
RATE_LIMIT_ENABLED: {{ .Values.rateLimit.enabled | quote }}
RATE_LIMIT_REQUESTS: {{ .Values.rateLimit.requests | int64 | quote }}
RATE_LIMIT_WINDOW_SECONDS: {{ .Values.rateLimit.windowSeconds | int64 | quote }}
RATE_LIMIT_TOKENS: {{ .Values.rateLimit.tokens | int64 | quote }}
RATE_LIMIT_TOKENS_WINDOW_SECONDS: {{ .Values.rateLimit.tokensWindowSeconds | int64 | quote }}
RATE_LIMIT_STREAMS: {{ .Values.rateLimit.streams | int64 | quote }}
RATE_LIMIT_FAIL_MODE: {{ .Values.rateLimit.failMode | quote }}
{{- if .Values.redis.enabled }}
REDIS_URL: {{ printf "redis://%s:6379/0" (include "itemstream.componentName" (dict "root" . "component" "redis")) | quote }}
{{- else if and .Values.redis.url (not .Values.redis.existingSecret) }}
REDIS_URL: {{ .Values.redis.url | quote }}
{{- end }}
{{- with .Values.security.allowedHosts }}
ALLOWED_HOSTS: {{ join "," . | quote }}
{{- end }}
HSTS_SECONDS: {{ .Values.security.hstsSeconds | int64 | quote }}
OTEL_SERVICE_NAME: {{ include "itemstream.fullname" . | quote }}
{{- if .Values.tracing.otlpEndpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ .Values.tracing.otlpEndpoint | quote }}
OTEL_EXPORTER_OTLP_PROTOCOL: {{ .Values.tracing.protocol | quote }}
OTEL_TRACES_SAMPLER: {{ .Values.tracing.sampler | quote }}
OTEL_TRACES_SAMPLER_ARG: {{ .Values.tracing.samplerArg | quote }}
{{- else }}
OTEL_TRACES_EXPORTER: "none"
{{- end }}
{{- end -}}

{{- define "itemstream.configChecksum" -}}
{{- include "itemstream.config" . | sha256sum -}}
{{- end -}}

{{/* The app answers /readyz within this (seconds), one second inside the probe's timeout. */}}
{{- define "itemstream.readinessTimeout" -}}
{{- max 1 (sub (int .Values.probes.readiness.timeoutSeconds) 1) -}}
{{- end -}}

{{/* PgBouncer >= 1.23 stops on SIGTERM once its clients have left; the app replaces each
     pooled connection within config.dbPoolRecycle, so that long (plus the preStop sleep and
     a margin) lets a PgBouncer pod go without cutting a request. */}}
{{- define "itemstream.pgbouncer.terminationGracePeriod" -}}
{{- add .Values.pgbouncer.preStopSleepSeconds .Values.config.dbPoolRecycle 15 -}}
{{- end -}}

{{/* The migration Job's spec, rendered once: the Job's name in `job` mode hashes it. */}}
{{- define "itemstream.migrations.jobSpec" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
backoffLimit: {{ $values.migrations.backoffLimit }}
activeDeadlineSeconds: {{ $values.migrations.activeDeadlineSeconds }}
{{- if and (not .hook) $values.migrations.ttlSecondsAfterFinished }}
ttlSecondsAfterFinished: {{ $values.migrations.ttlSecondsAfterFinished }}
{{- end }}
template:
  metadata:
    labels:
      {{- include "itemstream.labels" (dict "root" $root "component" "migrate") | nindent 6 }}
    {{- with $values.migrations.podAnnotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  spec:
    restartPolicy: Never
    {{- with $values.migrations.serviceAccountName }}
    serviceAccountName: {{ . }}
    {{- end }}
    automountServiceAccountToken: false
    {{- include "itemstream.imagePullSecrets" $root | nindent 4 }}
    securityContext:
      {{- toYaml $values.podSecurityContext | nindent 6 }}
    {{- with $values.migrations.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $values.migrations.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $values.migrations.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: migrate
        image: {{ include "itemstream.appImage" $root }}
        imagePullPolicy: {{ $values.image.pullPolicy }}
        args: ["migrate"]
        env:
          - name: ENVIRONMENT
            value: {{ $values.environment | quote }}
          - name: LOG_LEVEL
            value: {{ $values.logLevel | quote }}
          - name: DATABASE_URL
            value: {{ include "itemstream.app.databaseUrl" $root | quote }}
          - name: MIGRATION_DATABASE_URL
            value: {{ include "itemstream.migrationDatabaseUrl" $root | quote }}
          - name: DB_POOLER
            value: {{ include "itemstream.app.pooler" $root | quote }}
          - name: MIGRATION_WAIT_SECONDS
            value: {{ $values.migrations.databaseWaitSeconds | quote }}
          - name: METRICS_ENABLED
            value: "false"
          - name: OTEL_TRACES_EXPORTER
            value: "none"
          - name: DATABASE_PASSWORD
            valueFrom:
              secretKeyRef:
                name: {{ .secretName }}
                key: {{ .secretKey }}
          {{- include "itemstream.db.caEnv" $root | nindent 10 }}
        securityContext:
          {{- toYaml $values.containerSecurityContext | nindent 10 }}
        resources:
          {{- toYaml $values.migrations.resources | nindent 10 }}
        volumeMounts:
          - {name: tmp, mountPath: /tmp}
          {{- include "itemstream.db.caMount" $root | nindent 10 }}
    volumes:
      - name: tmp
        emptyDir: {}
      {{- include "itemstream.db.caVolume" $root | nindent 6 }}
{{- end -}}

{{/* The database's CA certificate (externalDatabase.caSecret), where pods mount it. */}}
{{- define "itemstream.db.caPath" -}}/etc/itemstream/db-ca/ca.crt{{- end -}}

{{- define "itemstream.db.caVolume" -}}
{{- if and (not .Values.postgresql.enabled) .Values.externalDatabase.caSecret }}
- name: db-ca
  secret:
    secretName: {{ .Values.externalDatabase.caSecret }}
    items:
      - {key: {{ .Values.externalDatabase.caSecretKey }}, path: ca.crt}
{{- end }}
{{- end -}}

{{- define "itemstream.db.caMount" -}}
{{- if and (not .Values.postgresql.enabled) .Values.externalDatabase.caSecret }}
- {name: db-ca, mountPath: /etc/itemstream/db-ca, readOnly: true}
{{- end }}
{{- end -}}

{{/* libpq's and asyncpg's variable for the CA of direct connections. */}}
{{- define "itemstream.db.caEnv" -}}
{{- if and (not .Values.postgresql.enabled) .Values.externalDatabase.caSecret }}
- name: PGSSLROOTCERT
  value: {{ include "itemstream.db.caPath" . }}
{{- end }}
{{- end -}}

{{/* PgBouncer's stats user, the exporter's: its own name, no password, admitted by pg_hba
     only from inside the pod (127.0.0.1), and allowed SHOW commands only. Never the app's
     credentials. */}}
{{- define "itemstream.pgbouncer.statsUser" -}}itemstream_stats{{- end -}}
