{{/*
Rules across several values, which values.schema.json cannot state with a useful message.
Each failure says what is wrong and what to set instead. Called once, from ca-configmap.yaml.
*/}}
{{- define "meshtls.validate" -}}
{{- $ca := .Values.ca -}}
{{- $agent := .Values.agent -}}
{{- if and (eq $ca.database.type "sqlite") (gt (int $ca.replicaCount) 1) -}}
{{- fail (printf "\n\nca.replicaCount is %d but ca.database.type is sqlite: SQLite is one file on one volume, so the CA runs one replica on it. For more replicas use an external PostgreSQL (ca.database.type=postgresql and ca.database.existingSecret; see values-ha.yaml); for more signing capacity in one pod raise ca.workers." (int $ca.replicaCount)) -}}
{{- end -}}
{{- if and (eq $ca.database.type "postgresql") (not $ca.database.existingSecret) -}}
{{- fail "\n\nca.database.type is postgresql but ca.database.existingSecret is empty: create a Secret holding the database URL, e.g.\n  kubectl create secret generic meshtls-db --from-literal=url='postgresql+psycopg://meshtls:PASSWORD@HOST:5432/meshtls'\nand set ca.database.existingSecret=meshtls-db (the key is ca.database.key, default \"url\")." -}}
{{- end -}}
{{- if and (eq $ca.database.type "postgresql") $ca.persistence.existingClaim -}}
{{- fail "\n\nca.persistence.existingClaim is set but ca.database.type is postgresql: the volume holds only the SQLite database. Remove ca.persistence.existingClaim." -}}
{{- end -}}
{{- $anchors := 0 -}}
{{- if $agent.trustBundle.pem }}{{ $anchors = add1 $anchors }}{{ end -}}
{{- if $agent.trustBundle.existingConfigMap }}{{ $anchors = add1 $anchors }}{{ end -}}
{{- if $agent.rootFingerprint }}{{ $anchors = add1 $anchors }}{{ end -}}
{{- if gt $anchors 1 -}}
{{- fail "\n\nagent.trustBundle.pem, agent.trustBundle.existingConfigMap and agent.rootFingerprint are alternatives: set only one of them." -}}
{{- end -}}
{{- if and $agent.trustBundle.pem (not (contains "-----BEGIN CERTIFICATE-----" $agent.trustBundle.pem)) -}}
{{- fail "\n\nagent.trustBundle.pem holds no PEM certificate: pass the CA's roots, e.g. --set-file agent.trustBundle.pem=bundle.pem (from `kubectl exec deploy/<release>-ca -- meshtls-ca bundle show`)." -}}
{{- end -}}
{{- if and (or $agent.inbound $agent.outbound) (not $agent.hostNetwork) -}}
{{- fail "\n\nagent.inbound/agent.outbound listeners need agent.hostNetwork=true: an inbound listener must be reachable at the node's address and an outbound one on the node's loopback, which the agent pod's own network namespace is not. Set agent.hostNetwork=true (see docs/KUBERNETES.md) or remove the listeners." -}}
{{- end -}}
{{- range $i, $l := concat $agent.inbound $agent.outbound -}}
{{- $port := int (include "meshtls.port" $l.listen) -}}
{{- if and (lt $port 1024) (ne $port 0) -}}
{{- fail (printf "\n\nagent listener %q listens on port %d: the agent runs without root and without capabilities, so it can bind ports from 1024 up only. Pick a port >= 1024." $l.name $port) -}}
{{- end -}}
{{- end -}}
{{- if and $ca.upstream.existingSecret (or (not $ca.upstream.certKey) (not $ca.upstream.keyKey) (not $ca.upstream.chainKey)) -}}
{{- fail "\n\nca.upstream.existingSecret needs ca.upstream.certKey, keyKey and chainKey (the keys of the intermediate, its private key and the chain to the root)." -}}
{{- end -}}
{{- $socketLimit := 107 -}}
{{- range $api := list "workloadApi" "sds" -}}
{{- $cfg := index $agent $api -}}
{{- if $cfg.enabled -}}
{{- $path := printf "%s/%s" $agent.socketDir $cfg.socket -}}
{{- if gt (len $path) $socketLimit -}}
{{- fail (printf "\n\nagent.%s socket path %s is %d bytes; a Unix socket path is at most %d bytes. Use a shorter agent.socketDir." $api $path (len $path) $socketLimit) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $agent.workloadApi.enabled $agent.sds.enabled (eq $agent.workloadApi.socket $agent.sds.socket) -}}
{{- fail "\n\nagent.workloadApi.socket and agent.sds.socket are the same file: give them different names." -}}
{{- end -}}
{{- end -}}
