{{/* Names and labels. */}}
{{- define "ferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ferry.fullname" -}}
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

{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ferry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ferry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ferry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ferry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
ferry.drainSeconds: the config's shutdown.drain_timeout in whole seconds.
Takes the ferry values (.Values.ferry).
*/}}
{{- define "ferry.drainSeconds" -}}
{{- $d := "25s" }}
{{- with .config.shutdown }}{{ with .drain_timeout }}{{ $d = toString . }}{{ end }}{{ end }}
{{- $d = trim $d }}
{{- if not (regexMatch "^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$" $d) }}
{{- fail (printf "ferry.config.shutdown.drain_timeout %q: write a duration, e.g. 25s, 1m30s, 1.5s or 500ms" $d) }}
{{- end }}
{{- $ms := 0.0 }}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ms|s|m|h)" $d -1 }}
{{- if hasSuffix "ms" . }}{{ $ms = addf $ms (trimSuffix "ms" . | float64) }}
{{- else if hasSuffix "s" . }}{{ $ms = addf $ms (mulf (trimSuffix "s" . | float64) 1000) }}
{{- else if hasSuffix "m" . }}{{ $ms = addf $ms (mulf (trimSuffix "m" . | float64) 60000) }}
{{- else }}{{ $ms = addf $ms (mulf (trimSuffix "h" . | float64) 3600000) }}
{{- end }}
{{- end }}
{{- /* Whole seconds, rounded up: the grace period must cover all of it. */}}
{{- ceil (divf $ms 1000) | int }}
{{- end }}

{{/*
ferry.probe: a probe of ferry's `path` on its admin port, with the values' settings; a probe in
the values that gives its own handler (httpGet, exec, tcpSocket or grpc) is taken as it is, as
Kubernetes takes one handler per probe.
*/}}
{{- define "ferry.probe" -}}
{{- $probe := deepCopy (.probe | default dict) }}
{{- if not (or (hasKey $probe "httpGet") (hasKey $probe "exec") (hasKey $probe "tcpSocket") (hasKey $probe "grpc")) }}
{{- $_ := set $probe "httpGet" (dict "path" .path "port" "ferry-admin") }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/*
ferry.config: the ferry.yaml the sidecar runs, as text. Takes a dict:
  ferry:   the ferry values (image, config, adminPort, adminTokenSecret, ...)
  prestop: whether the app's preStop hook drains ferry (admin.prestop)
  group:   the default kafka.group_id
Secrets must be ${VAR} references: a literal password in the values is refused.
*/}}
{{- define "ferry.config" -}}
{{- $f := .ferry -}}
{{- $config := deepCopy $f.config }}
{{- if not $config.routes }}
{{- fail "ferry.config.routes is empty: give ferry at least one route (SPEC §2)" }}
{{- end }}
{{- $kafka := $config.kafka | default dict }}
{{- if not $kafka.group_id }}{{ $_ := set $kafka "group_id" .group }}{{ end }}
{{- range $key, $value := ($kafka.properties | default dict) }}
{{- if and (has $key (list "sasl.password" "ssl.key.password" "ssl.keystore.password" "sasl.oauthbearer.client.secret")) (not (hasPrefix "${" (toString $value))) }}
{{- fail (printf "ferry.config.kafka.properties.%s holds a literal secret: put it in a Kubernetes Secret, expose it with ferry.secretEnv and write \"${VAR}\" here" $key) }}
{{- end }}
{{- end }}
{{- $_ := set $config "kafka" $kafka }}
{{- $admin := $config.admin | default dict }}
{{- if $admin.token }}
{{- if not (hasPrefix "${" (toString $admin.token)) }}
{{- fail "ferry.config.admin.token holds a literal secret: use ferry.adminTokenSecret" }}
{{- end }}
{{- end }}
{{- $host := $f.adminHost | default "0.0.0.0" }}
{{- /* An IPv6 address goes in brackets before its port. */}}
{{- $_ := set $admin "listen" (printf (ternary "[%s]:%v" "%s:%v" (contains ":" $host)) $host $f.adminPort) }}
{{- if dig "adminTokenSecret" "name" "" $f }}{{ $_ := set $admin "token" "${FERRY_ADMIN_TOKEN}" }}{{ end }}
{{- if .prestop }}{{ $_ := set $admin "prestop" true }}{{ end }}
{{- $_ := set $config "admin" $admin }}
{{- toYaml $config }}
{{- end }}

{{/*
ferry.sidecar: ferry's container, for a pod's initContainers (mode native) or containers
(mode container). Takes a dict:
  ferry:     the ferry values
  configMap: the name of the ConfigMap holding ferry.yaml
  context:   the root context ($)
Another chart can add ferry to its own pods with it; see the chart's README.
*/}}
{{- define "ferry.sidecar" -}}
{{- $f := .ferry -}}
- name: ferry
  {{- /* In another chart, that chart's appVersion is not ferry's: the tag must be given. */}}
  {{- $tag := $f.image.tag | default (ternary .context.Chart.AppVersion "" (eq .context.Chart.Name "ferry")) }}
  {{- if not $tag }}{{ fail "the ferry sidecar's image.tag is required: in another chart, that chart's appVersion is not ferry's" }}{{ end }}
  image: "{{ $f.image.repository }}:{{ $tag }}"
  imagePullPolicy: {{ $f.image.pullPolicy }}
  {{- if eq $f.mode "native" }}
  # A native sidecar: started before the app containers, stopped after them.
  restartPolicy: Always
  {{- end }}
  args: ["run", "-c", "/etc/ferry/ferry.yaml"]
  ports:
    - name: ferry-admin
      containerPort: {{ $f.adminPort }}
      protocol: TCP
  env:
    {{- if dig "adminTokenSecret" "name" "" $f }}
    - name: FERRY_ADMIN_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $f.adminTokenSecret.name }}
          key: {{ $f.adminTokenSecret.key }}
    {{- end }}
    {{- range $f.secretEnv }}
    - name: {{ .name }}
      valueFrom:
        secretKeyRef:
          name: {{ .secret }}
          key: {{ .key }}
    {{- end }}
    {{- with $f.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  # Liveness fails only when the poll loop is stuck; readiness follows the consumer and the app.
  startupProbe:
    httpGet:
      path: /healthz
      port: ferry-admin
    periodSeconds: 2
    failureThreshold: 30
  livenessProbe:
    {{- include "ferry.probe" (dict "probe" $f.livenessProbe "path" "/healthz") | nindent 4 }}
  readinessProbe:
    {{- include "ferry.probe" (dict "probe" $f.readinessProbe "path" "/readyz") | nindent 4 }}
  resources:
    {{- toYaml $f.resources | nindent 4 }}
  securityContext:
    {{- toYaml $f.securityContext | nindent 4 }}
  volumeMounts:
    - name: ferry-config
      mountPath: /etc/ferry
      readOnly: true
    {{- range $i, $s := $f.secretFiles }}
    - name: ferry-secret-{{ $i }}
      mountPath: {{ $s.mountPath }}
      readOnly: true
    {{- end }}
{{- end }}

{{/* ferry.volume: the pod volume ferry.sidecar mounts. Same dict as ferry.sidecar. */}}
{{- define "ferry.volume" -}}
- name: ferry-config
  configMap:
    name: {{ .configMap }}
{{- range $i, $s := .ferry.secretFiles }}
- name: ferry-secret-{{ $i }}
  secret:
    secretName: {{ $s.secret }}
{{- end }}
{{- end }}
