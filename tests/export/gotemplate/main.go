// Renders Ollama TEMPLATEs with Go's own text/template, the engine Ollama uses.
//
// stdin: a JSON list of {"template": ..., "messages": [{"role": ..., "content": ...}]}
// stdout: a JSON list of rendered prompts ("ERROR: ..." for a template that fails).
// The values mirror Ollama's chat path (template.Execute with .Messages): all system messages
// joined by a blank line as .System, consecutive messages of one role merged, .Response empty.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Request struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func render(r Request) string {
	var system []string
	var messages []*Message
	for i := range r.Messages {
		m := r.Messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(messages); n > 0 && messages[n-1].Role == m.Role {
			messages[n-1].Content += "\n\n" + m.Content
		} else {
			messages = append(messages, &m)
		}
	}
	t, err := template.New("").Option("missingkey=zero").Parse(r.Template)
	if err != nil {
		return "ERROR: " + err.Error()
	}
	var out strings.Builder
	values := map[string]any{
		"System":   strings.Join(system, "\n\n"),
		"Messages": messages,
		"Tools":    nil,
		"Response": "",
	}
	if err := t.Execute(&out, values); err != nil {
		return "ERROR: " + err.Error()
	}
	return out.String()
}

func main() {
	var requests []Request
	if err := json.NewDecoder(os.Stdin).Decode(&requests); err != nil {
		panic(err)
	}
	out := make([]string, len(requests))
	for i, r := range requests {
		out[i] = render(r)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
