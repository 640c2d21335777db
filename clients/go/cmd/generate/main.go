// Streams one generation from a protoserve engine, with a deadline and Ctrl-C cancellation.
//
//	go run ./cmd/generate -addr 127.0.0.1:50051 -prompt "Once upon a time" -max-tokens 32 -timeout 30s
//
// Cancelling the context (Ctrl-C) or reaching the deadline cancels the gRPC call; the engine
// aborts the request and frees its KV blocks within one step.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "github.com/protoserve/protoserve/gen/go/protoserve/v1"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "engine gRPC address")
	prompt := flag.String("prompt", "Once upon a time", "text prompt")
	maxTokens := flag.Int("max-tokens", 32, "tokens to generate")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline of the call")
	flag.Parse()

	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("dial %s: %v", *addr, err)
	}
	defer conn.Close()

	// The deadline travels as grpc-timeout: the engine evicts or stops the request when it passes.
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
	defer stop()

	stream, err := pb.NewInferenceClient(conn).Generate(ctx, &pb.GenerateRequest{
		Input:    &pb.GenerateRequest_Text{Text: *prompt},
		Sampling: &pb.SamplingParams{MaxTokens: proto.Int32(int32(*maxTokens))},
	})
	if err != nil {
		log.Fatalf("generate: %v", err)
	}
	for {
		response, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			if status.Code(err) == codes.DeadlineExceeded {
				log.Fatalf("deadline of %s exceeded", *timeout)
			}
			log.Fatalf("stream: %v", err)
		}
		switch event := response.Event.(type) {
		case *pb.GenerateResponse_Delta:
			fmt.Print(event.Delta.Text)
		case *pb.GenerateResponse_Finished:
			fmt.Printf("\n[finish: %s, %d tokens]\n", event.Finished.Reason, event.Finished.CompletionTokens)
		case *pb.GenerateResponse_Usage:
			fmt.Printf("[usage: prompt %d, completion %d]\n", event.Usage.PromptTokens, event.Usage.CompletionTokens)
		}
	}
}
