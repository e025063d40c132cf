{{/* Names, labels, the image and the paths shared by the templates. */}}

{{- define "meshtls.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "meshtls.ca.name" -}}{{ include "meshtls.fullname" . }}-ca{{- end -}}
{{- define "meshtls.agent.name" -}}{{ include "meshtls.fullname" . }}-agent{{- end -}}
{{- define "meshtls.kek.secretName" -}}
{{- .Values.ca.kek.existingSecret | default (printf "%s-kek" (include "meshtls.ca.name" .)) -}}
{{- end -}}

{{- define "meshtls.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshtls
{{- with .Values.global.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: include with (list $ "ca") or (list $ "agent"). */}}
{{- define "meshtls.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ $root.Chart.Name }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "meshtls.componentLabels" -}}
{{ include "meshtls.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "meshtls.image" -}}
{{- $image := .Values.global.image -}}
{{- if $image.digest -}}
{{ $image.repository }}@{{ $image.digest }}
{{- else -}}
{{ $image.repository }}:{{ $image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* The CA's Service DNS names, the short ones first. */}}
{{- define "meshtls.ca.dnsNames" -}}
{{- $svc := include "meshtls.ca.name" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.global.clusterDomain) -}}
{{- toJson (concat $names .Values.ca.serverDnsNames | uniq) -}}
{{- end -}}

{{/* The host name agents dial: the fully qualified Service name (no search-path lookups). */}}
{{- define "meshtls.ca.host" -}}
{{- printf "%s.%s.svc.%s" (include "meshtls.ca.name" .) .Release.Namespace .Values.global.clusterDomain -}}
{{- end -}}

{{- define "meshtls.ca.allowedServiceAccounts" -}}
{{- $default := list (printf "%s/%s" .Release.Namespace (include "meshtls.agent.name" .)) -}}
{{- toJson (.Values.ca.kubernetes.allowedServiceAccounts | default $default) -}}
{{- end -}}

{{/* Paths inside the containers. */}}
{{- define "meshtls.ca.configDir" -}}/etc/meshtls-ca{{- end -}}
{{- define "meshtls.ca.dataDir" -}}/var/lib/meshtls-ca{{- end -}}
{{- define "meshtls.ca.upstreamDir" -}}/etc/meshtls-ca/upstream{{- end -}}
{{- define "meshtls.agent.configDir" -}}/etc/meshtls{{- end -}}
{{- define "meshtls.agent.bundleDir" -}}/etc/meshtls/bundle{{- end -}}
{{- define "meshtls.agent.tokenDir" -}}/var/run/secrets/tokens{{- end -}}
{{- define "meshtls.agent.tokenFile" -}}meshtls-ca{{- end -}}

{{/* Does the agent have a trust anchor, and so is it deployed? */}}
{{- define "meshtls.agent.deployed" -}}
{{- $a := .Values.agent -}}
{{- if and $a.enabled (or $a.trustBundle.pem $a.trustBundle.existingConfigMap $a.rootFingerprint) -}}true{{- end -}}
{{- end -}}

{{- define "meshtls.agent.bundleConfigMap" -}}
{{- .Values.agent.trustBundle.existingConfigMap | default (printf "%s-bundle" (include "meshtls.agent.name" .)) -}}
{{- end -}}

{{/* The port of a HOST:PORT or [IPV6]:PORT listen address. */}}
{{- define "meshtls.port" -}}
{{- $parts := splitList ":" . -}}
{{- last $parts -}}
{{- end -}}
