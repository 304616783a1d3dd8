// A DagNats Go worker used as the test peer of tests/test_dagnats.py and
// bench/dagnats.py: DagNats's own worker package (github.com/danmestas/dagnats/worker,
// a dependency, never copied) serving one task type, so a jsworker worker in DagNats
// mode can be checked against the real Go implementation on the same consumers.
//
//	dagnats-peer -type T [-groups g1,g2] [-partitions N] [-singleton] [-sleep 10ms]
//
// Each handled task completes with {"by": "go", "worker": <id>, "input": <input>}
// and prints one line "ran <run> <step> <attempt>" on stdout.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/danmestas/dagnats/worker"
	"github.com/nats-io/nats.go"
)

func main() {
	url := flag.String("url", os.Getenv("NATS_URL"), "NATS URL")
	taskType := flag.String("type", "", "task type to serve")
	groups := flag.String("groups", "", "comma-separated worker groups")
	partitions := flag.Int("partitions", 0, "elastic partitions (0: shared consumer)")
	singleton := flag.Bool("singleton", false, "serve as a singleton")
	sleep := flag.Duration("sleep", 0, "time each task takes")
	quiet := flag.Bool("quiet", false, "print no line per task")
	flag.Parse()
	if *taskType == "" {
		fmt.Fprintln(os.Stderr, "dagnats-peer: -type is required")
		os.Exit(2)
	}
	nc, err := nats.Connect(*url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dagnats-peer: connect:", err)
		os.Exit(1)
	}
	defer nc.Close()
	var opts []worker.WorkerOption
	if *groups != "" {
		opts = append(opts, worker.WithGroups(strings.Split(*groups, ",")...))
	}
	if *partitions > 0 {
		opts = append(opts, worker.WithPartitions(*partitions))
	}
	w := worker.NewWorker(nc, opts...)
	handler := func(ctx worker.TaskContext) error {
		if *sleep > 0 {
			time.Sleep(*sleep)
		}
		if !*quiet {
			fmt.Printf("ran %s %s %d\n", ctx.RunID(), ctx.StepID(), ctx.RetryCount())
		}
		out, _ := json.Marshal(map[string]any{
			"by": "go", "input": json.RawMessage(orNull(ctx.Input())),
		})
		return ctx.Complete(out)
	}
	if *singleton {
		w.HandleSingleton(*taskType, handler)
	} else {
		w.Handle(*taskType, handler)
	}
	w.Start()
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	w.Stop()
}

func orNull(b []byte) []byte {
	if len(b) == 0 {
		return []byte("null")
	}
	return b
}
