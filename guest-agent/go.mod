module vmfleet/guest-agent

go 1.19
