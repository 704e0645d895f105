{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "spine-wff.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "spine-wff.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "spine-wff.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spine-wff.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: triton
{{- end -}}

{{- define "spine-wff.labels" -}}
{{ include "spine-wff.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: spine-wff
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "spine-wff.artifactsClaim" -}}
{{- .Values.artifacts.existingClaim | default (printf "%s-artifacts" (include "spine-wff.fullname" .)) -}}
{{- end -}}

{{- define "spine-wff.plansClaim" -}}
{{- .Values.plans.existingClaim | default (printf "%s-plans" (include "spine-wff.fullname" .)) -}}
{{- end -}}

{{/* Volume mounts of both containers (the triton container adds /dev/shm). */}}
{{- define "spine-wff.volumeMounts" -}}
- name: artifacts
  mountPath: /models/artifacts
  readOnly: true
  {{- with .Values.artifacts.subPath }}
  subPath: {{ . }}
  {{- end }}
- name: state
  mountPath: /models/state
- name: plans
  mountPath: /models/plans
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Environment shared by the prepare init container and tritonserver (docker/entrypoint.sh).
     Numbers go through int64: Helm reads YAML numbers as float64, which print as 6.7108864e+07. */}}
{{- define "spine-wff.env" -}}
- name: WFF_ARTIFACTS
  value: /models/artifacts
- name: WFF_STATE
  value: /models/state
- name: WFF_TARGET
  value: {{ .Values.target | quote }}
- name: WFF_INSTANCE_KIND
  value: {{ .Values.instanceKind | quote }}
- name: WFF_TRT_PRECISION
  value: {{ .Values.trt.precision | quote }}
- name: WFF_TRT_WORKSPACE_MIB
  value: {{ .Values.trt.workspaceMiB | int64 | quote }}
- name: WFF_TRT_PLAN_CACHE
  value: /models/plans
- name: WFF_TRT_TIMING_CACHE
  value: /models/plans/tensorrt_timing.cache
- name: WFF_EXIT_TIMEOUT_S
  value: {{ .Values.exitTimeoutSeconds | int64 | quote }}
- name: WFF_PYTHON_SHM_DEFAULT_BYTES
  value: {{ .Values.python.shmDefaultBytes | int64 | quote }}
- name: WFF_PYTHON_SHM_GROWTH_BYTES
  value: {{ .Values.python.shmGrowthBytes | int64 | quote }}
{{- end -}}
