// The module path matches the protos' go_package (github.com/protoserve/protoserve/gen/go/...),
// so the generated packages under gen/go import without replace directives.
module github.com/protoserve/protoserve

go 1.22

require (
	google.golang.org/genproto/googleapis/api v0.0.0-20241015192408-796eee8c2d53
	google.golang.org/grpc v1.67.1
	google.golang.org/protobuf v1.35.1
)
