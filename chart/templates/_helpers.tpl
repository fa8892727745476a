{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "shardlease.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: <release>-<chart>, or the release name when it already contains the chart name.
Truncated to 52 characters, so that the longest suffix ("-metrics", "-migrate") still fits in a 63-character name.
*/}}
{{- define "shardlease.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "shardlease.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels. Call with (dict "ctx" $ "component" "worker").
The component is part of the selector so that the worker and PostgreSQL pods never match each other's selectors.
*/}}
{{- define "shardlease.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardlease.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Standard labels on every object. Call with (dict "ctx" $ "component" "worker").
*/}}
{{- define "shardlease.labels" -}}
helm.sh/chart: {{ include "shardlease.chart" .ctx }}
{{ include "shardlease.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: shardlease
{{- end }}

{{/*
Name of the worker ServiceAccount.
*/}}
{{- define "shardlease.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shardlease.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The worker image reference.
*/}}
{{- define "shardlease.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Bundled PostgreSQL object names. A StatefulSet's pods carry a controller-revision-hash label
"<statefulset>-<10 characters>", so the StatefulSet name must stay within 52 characters:
41 + len("-postgresql") = 52 (and the headless Service adds "-hl": 55).
*/}}
{{- define "shardlease.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "shardlease.fullname" . | trunc 41 | trimSuffix "-") }}
{{- end }}

{{- define "shardlease.postgresql.image" -}}
{{- printf "%s:%s" .Values.postgresql.image.repository .Values.postgresql.image.tag }}
{{- end }}

{{/*
The Secret holding DATABASE_URL: the chart-generated one for the bundled PostgreSQL,
otherwise the user's externalDatabase.existingSecret.
*/}}
{{- define "shardlease.databaseSecretName" -}}
{{- if .Values.postgresql.enabled }}
{{- printf "%s-db" (include "shardlease.fullname" .) }}
{{- else }}
{{- .Values.externalDatabase.existingSecret }}
{{- end }}
{{- end }}

{{/*
The key of DATABASE_URL in that Secret.
*/}}
{{- define "shardlease.databaseSecretKey" -}}
{{- if .Values.postgresql.enabled }}
{{- print "DATABASE_URL" }}
{{- else }}
{{- .Values.externalDatabase.existingSecretKey }}
{{- end }}
{{- end }}

{{/*
The DATABASE_URL env var, read from the database Secret.
*/}}
{{- define "shardlease.databaseUrlEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "shardlease.databaseSecretName" . }}
      key: {{ include "shardlease.databaseSecretKey" . }}
{{- end }}

{{/*
The Secret and key of the DATABASE_URL the workers, helm test and KEDA connect with: roles.memberSecret (a login
of the member role) when set, otherwise the migrations' own (databaseSecretName/Key).
*/}}
{{- define "shardlease.memberSecretName" -}}
{{- default (include "shardlease.databaseSecretName" .) .Values.roles.memberSecret }}
{{- end }}

{{- define "shardlease.memberSecretKey" -}}
{{- if .Values.roles.memberSecret }}
{{- default "DATABASE_URL" .Values.roles.memberSecretKey }}
{{- else }}
{{- include "shardlease.databaseSecretKey" . }}
{{- end }}
{{- end }}

{{/*
The DATABASE_URL env var of the workers (run) and helm test, read from the members' Secret.
*/}}
{{- define "shardlease.memberDatabaseUrlEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "shardlease.memberSecretName" . }}
      key: {{ include "shardlease.memberSecretKey" . }}
{{- end }}

{{/*
The key of WORK_DATABASE_URL in workDatabase.existingSecret (empty secretKey: WORK_DATABASE_URL).
*/}}
{{- define "shardlease.workDatabaseSecretKey" -}}
{{- default "WORK_DATABASE_URL" .Values.workDatabase.secretKey }}
{{- end }}

{{/*
The WORK_DATABASE_URL env var of the worker container (`run` only: the fenced ticks), read from
workDatabase.existingSecret. Renders nothing when that is unset: the worker then ticks over DATABASE_URL.
Never given to migrate, status or KEDA: they need DATABASE_URL, a direct connection.
*/}}
{{- define "shardlease.workDatabaseUrlEnv" -}}
{{- if .Values.workDatabase.existingSecret }}
- name: WORK_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.workDatabase.existingSecret }}
      key: {{ include "shardlease.workDatabaseSecretKey" . }}
{{- end }}
{{- end }}

{{/*
Where migrations run: "hook", "initContainer" or "none" (resolves migrations.strategy=auto).
*/}}
{{- define "shardlease.migrationMode" -}}
{{- $s := .Values.migrations.strategy }}
{{- if eq $s "auto" }}
{{- if .Values.postgresql.enabled }}initContainer{{ else }}hook{{ end }}
{{- else }}
{{- $s }}
{{- end }}
{{- end }}

{{/*
Whether the Deployment sets `replicas`: not when an autoscaler owns the count.
*/}}
{{- define "shardlease.autoscaled" -}}
{{- if or .Values.keda.enabled .Values.hpa.enabled }}true{{ end }}
{{- end }}

{{/*
Checks of value combinations that the JSON schema cannot express. Rendering fails with a clear message.
*/}}
{{- define "shardlease.validateValues" -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.externalDatabase.existingSecret) }}
{{- fail "shardlease: postgresql.enabled=false needs externalDatabase.existingSecret: the name of an existing Secret whose key externalDatabase.existingSecretKey (default DATABASE_URL) holds a postgres:// connection string. Create it first, e.g. kubectl create secret generic shardlease-db --from-literal=DATABASE_URL=postgres://user:pass@host:5432/db" }}
{{- end }}
{{- if and .Values.postgresql.enabled .Values.externalDatabase.existingSecret }}
{{- fail "shardlease: externalDatabase.existingSecret is set but postgresql.enabled=true; set postgresql.enabled=false to use the external database, or unset externalDatabase.existingSecret to use the bundled one." }}
{{- end }}
{{- if and .Values.workDatabase.secretKey (not .Values.workDatabase.existingSecret) }}
{{- fail (printf "shardlease: workDatabase.secretKey=%s is set but workDatabase.existingSecret is empty: name the Secret that holds the work connection string (WORK_DATABASE_URL), e.g. kubectl create secret generic shardlease-work-db --from-literal=%s=postgres://app:pw@pgbouncer:6432/app and --set workDatabase.existingSecret=shardlease-work-db; or unset workDatabase.secretKey to tick over DATABASE_URL." .Values.workDatabase.secretKey .Values.workDatabase.secretKey) }}
{{- end }}
{{- if .Values.workDatabase.existingSecret }}
{{- range .Values.worker.extraEnv }}
{{- if eq .name "WORK_DATABASE_URL" }}
{{- fail "shardlease: WORK_DATABASE_URL is set twice, by workDatabase.existingSecret and in worker.extraEnv; keep only workDatabase.existingSecret." }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.keda.enabled .Values.hpa.enabled }}
{{- fail "shardlease: keda.enabled and hpa.enabled are mutually exclusive: both would own the Deployment's replica count. Enable only one of them." }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicaCount) (int .Values.keda.maxReplicaCount)) }}
{{- fail "shardlease: keda.minReplicaCount must not exceed keda.maxReplicaCount." }}
{{- end }}
{{- if and .Values.hpa.enabled (gt (int .Values.hpa.minReplicas) (int .Values.hpa.maxReplicas)) }}
{{- fail "shardlease: hpa.minReplicas must not exceed hpa.maxReplicas." }}
{{- end }}
{{- $roles := .Values.roles }}
{{- if and $roles.memberSecretKey (not $roles.memberSecret) }}
{{- fail (printf "shardlease: roles.memberSecretKey=%s is set but roles.memberSecret is empty: name the Secret that holds the workers' DATABASE_URL (a login of the member role), or unset roles.memberSecretKey." $roles.memberSecretKey) }}
{{- end }}
{{- if and .Values.postgresql.enabled (or $roles.member $roles.inspector $roles.memberSecret) }}
{{- fail "shardlease: roles.* need an external database whose roles you create (CREATE ROLE ... LOGIN PASSWORD ...): set postgresql.enabled=false and externalDatabase.existingSecret (the schema owner, for the migrations), or unset roles.member, roles.inspector and roles.memberSecret to run everything as the bundled database's owner." }}
{{- end }}
{{- if and (or $roles.member $roles.inspector) (eq (include "shardlease.migrationMode" .) "none") }}
{{- fail "shardlease: roles.member and roles.inspector are granted by the migrations, but migrations.strategy=none: run `shardlease-worker grant --member-role ... --inspector-role ...` yourself and unset them, or let the chart migrate (migrations.strategy=hook)." }}
{{- end }}
{{- if and $roles.memberSecret (eq (include "shardlease.migrationMode" .) "initContainer") }}
{{- fail "shardlease: roles.memberSecret separates the workers' credentials from the owner's, but migrations.strategy=initContainer would put the owner's (externalDatabase.existingSecret) into every worker pod: use migrations.strategy=hook (the default for an external database) or none." }}
{{- end }}
{{- if and $roles.member (not $roles.memberSecret) }}
{{- fail (printf "shardlease: roles.member=%s is set but the workers would still connect with the owner's credentials: set roles.memberSecret to a Secret whose DATABASE_URL logs in as %s." $roles.member $roles.member) }}
{{- end }}
{{- if $roles.memberSecret }}
{{- range .Values.worker.extraEnv }}
{{- if eq .name "DATABASE_URL" }}
{{- fail "shardlease: DATABASE_URL is set twice, by roles.memberSecret and in worker.extraEnv; keep only roles.memberSecret." }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq .Values.migrations.strategy "hook") .Values.postgresql.enabled }}
{{- fail "shardlease: migrations.strategy=hook cannot work with the bundled PostgreSQL: Helm creates its StatefulSet only after the pre-install hooks finish. Use migrations.strategy=auto (initContainer) or an external database." }}
{{- end }}
{{- end }}

{{/*
Environment shared by every container that runs the worker binary (run, migrate, status), but DATABASE_URL.
*/}}
{{- define "shardlease.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: SHARDLEASE_GROUP
  value: {{ .Values.worker.group | quote }}
- name: SHARDLEASE_HEARTBEAT
  value: {{ .Values.worker.heartbeat | quote }}
- name: SHARDLEASE_LEASE_TTL
  value: {{ .Values.worker.leaseTtl | quote }}
- name: SHARDLEASE_TICK
  value: {{ .Values.worker.tick | quote }}
- name: SHARDLEASE_LOG_FORMAT
  value: {{ .Values.worker.logFormat | quote }}
- name: SHARDLEASE_HTTP_ADDR
  value: {{ printf "0.0.0.0:%d" (int .Values.worker.httpPort) | quote }}
{{- end }}

{{/*
Environment of the containers that run as the workers do (run, helm test's status): DATABASE_URL from the
members' Secret (roles.memberSecret) when set, otherwise the migrations' own.
*/}}
{{- define "shardlease.workerEnv" -}}
{{ include "shardlease.commonEnv" . }}
{{ include "shardlease.memberDatabaseUrlEnv" . }}
{{- end }}

{{/*
Environment of the migrations (Job or initContainer): the owner's DATABASE_URL, and the roles to grant.
*/}}
{{- define "shardlease.migrationEnv" -}}
{{ include "shardlease.commonEnv" . }}
{{ include "shardlease.databaseUrlEnv" . }}
{{- with .Values.roles.member }}
- name: SHARDLEASE_MEMBER_ROLE
  value: {{ . | quote }}
{{- end }}
{{- with .Values.roles.inspector }}
- name: SHARDLEASE_INSPECTOR_ROLE
  value: {{ . | quote }}
{{- end }}
{{- end }}
