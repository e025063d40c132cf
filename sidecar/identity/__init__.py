"""The sidecar's identity lifecycle: keys and CSRs, the CA client, persisted state and the
manager that enrolls the node and keeps its workload X509-SVIDs fresh."""
