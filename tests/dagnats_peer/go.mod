module jsworker.test/dagnats-peer

go 1.26.2

require (
	github.com/danmestas/dagnats v0.0.12
	github.com/nats-io/nats.go v1.52.0
	// v0.2.1 and v0.3.1 (DagNats v0.0.12's own) are not served by the module proxy here
	github.com/synadia-io/orbit.go/jetstreamext v0.3.2
	github.com/synadia-io/orbit.go/pcgroups v0.2.2
)
